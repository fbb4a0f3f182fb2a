"""Compare two junit XML reports of the same diffusers tests: unpatched, then under
agentsd_everywhere. Prints the totals and every test whose outcome or failure text differs;
exits 1 if a test passes unpatched and fails patched."""

import collections
import sys
import xml.etree.ElementTree as ET


def outcomes(path: str) -> dict[str, tuple[str, str]]:
    """test id -> (outcome, first line of its failure message)"""
    found = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        test = f"{case.get('classname')}::{case.get('name')}"
        outcome, text = "passed", ""
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                text = (node.get("message") or "").strip().splitlines()[:1]
                text = text[0][:160] if text else ""
                break
        found[test] = (outcome, text)
    return found


def main(plain_xml: str, patched_xml: str) -> int:
    plain, patched = outcomes(plain_xml), outcomes(patched_xml)
    for name, runs in (("plain", plain), ("patched", patched)):
        print(f"{name}: {len(runs)} tests", dict(collections.Counter(o for o, _ in runs.values())))
    broken = sorted(t for t, (o, _) in plain.items() if o == "passed" and patched.get(t, ("missing",))[0] != "passed")
    changed = sorted(t for t in plain.keys() & patched.keys() if t not in broken and plain[t] != patched[t])
    missing = sorted(plain.keys() ^ patched.keys())
    print(f"\n== pass plain, not patched: {len(broken)}")
    for t in broken:
        print(" ", t, patched.get(t))
    print(f"== other differences (outcome or failure text): {len(changed)}")
    for t in changed:
        print(" ", t, plain[t], "->", patched[t])
    print(f"== in one run only: {len(missing)}")
    for t in missing:
        print(" ", t)
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
