"""pytest plugin for both runs: diffusers' tests load the tokenizer 'hf-internal-testing/tiny-random-clip'
from the hub. Offline, transformers 5 returns an empty tokenizer whose model_max_length (1e30) overflows
when a pipeline encodes a prompt, which would fail most tests in both runs and hide what agentsd changes.
Here that tokenizer is agentsd's local one-token-per-character CLIP tokenizer (514 ids, under the tests'
1000-word text encoders)."""

from transformers import CLIPTokenizer

from agentsd.models import _tiny_tokenizer

_HUB_TOKENIZER = "hf-internal-testing/tiny-random-clip"


def pytest_configure(config):
    from_pretrained = CLIPTokenizer.from_pretrained.__func__

    def local_tiny_tokenizer(cls, name, *args, **kwargs):
        if name == _HUB_TOKENIZER and not kwargs.get("subfolder"):
            return _tiny_tokenizer()
        return from_pretrained(cls, name, *args, **kwargs)

    CLIPTokenizer.from_pretrained = classmethod(local_tiny_tokenizer)
