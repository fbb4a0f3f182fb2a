"""Generating images with a pipeline: batches with one seed per image, progress bars over images
and steps, PNG files whose metadata regenerate them, and seconds and peak memory per image."""

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL.PngImagePlugin import PngInfo
from tqdm.auto import tqdm


@dataclass
class Job:
    index: int
    prompt: str
    seed: int


@dataclass
class GenerationStats:
    images: int = 0
    timed_images: int = 0  # the first batch warms up and is left out when there are others
    timed_seconds: float = 0.0
    peak_gb: float | None = None  # largest peak of a batch, over its size

    @property
    def seconds_per_image(self) -> float | None:
        return self.timed_seconds / self.timed_images if self.timed_images else None


def generate_images(pipe, jobs: list[Job], *, save, steps: int, guidance: float, height: int, width: int,
                    batch_size: int, negative_prompt: str | None = None,
                    progress: bool = True) -> GenerationStats:  # fmt: skip
    """Run `jobs` in batches and call save(job, image) for each. Image i depends only on its prompt,
    seed and the settings (one CPU generator per image), and on its batch only where ToMe merges
    without guidance (guidance <= 1): an odd batch then takes top-left destinations (tomesd's rule),
    so the batch size is a setting there."""
    device = pipe.device
    cuda = device.type == "cuda"
    stats = GenerationStats()
    pipe.set_progress_bar_config(disable=True)
    images_bar = tqdm(total=len(jobs), desc="images", unit="img", disable=not progress)
    steps_bar = tqdm(total=steps, desc="steps", unit="step", leave=False, disable=not progress)

    def step_done(pipeline, step, timestep, callback_kwargs):
        # The UNet runs once per timestep of the scheduler, not once per requested step (PNDM: 51 for
        # 50, Heun: 2n - 1); the pipeline knows the count once the loop has started.
        if step == 0:
            steps_bar.total = getattr(pipeline, "num_timesteps", None) or len(pipeline.scheduler.timesteps)
        steps_bar.update(1)
        return callback_kwargs

    batches = [jobs[i : i + batch_size] for i in range(0, len(jobs), batch_size)]
    with images_bar, steps_bar:  # closed on an error too, before the error is reported
        for number, batch in enumerate(batches):
            steps_bar.reset(total=steps)
            negative = None if negative_prompt is None else [negative_prompt] * len(batch)
            if cuda:
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
            start = time.perf_counter()
            images = pipe(
                prompt=[job.prompt for job in batch], negative_prompt=negative, num_inference_steps=steps,
                guidance_scale=guidance, height=height, width=width,
                generator=[torch.Generator().manual_seed(job.seed) for job in batch],
                callback_on_step_end=step_done,
            ).images  # fmt: skip
            if cuda:
                torch.cuda.synchronize(device)
                peak = torch.cuda.max_memory_allocated(device) / 2**30 / len(batch)
                stats.peak_gb = max(stats.peak_gb or 0.0, peak)
            if number > 0 or len(batches) == 1:
                stats.timed_seconds += time.perf_counter() - start
                stats.timed_images += len(batch)
            for job, image in zip(batch, images):
                save(job, image)
            stats.images += len(batch)
            images_bar.update(len(batch))
    return stats


def claim_png(folder: Path, number: int) -> Path:
    """The first NNNNN.png from `number` on that nothing holds, created empty (O_EXCL) so that runs
    writing into one folder at once never take the same name (save_png then writes over it)."""
    while True:
        path = folder / f"{number:05d}.png"
        try:
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            return path
        except FileExistsError:
            number += 1


def save_png(path: Path, image, metadata: dict) -> None:
    """A PNG with `metadata` in its text chunks: each key, and all of it as JSON under "agentsd".
    Written beside and renamed into place, so that a run killed mid-write leaves no truncated PNG."""
    info = PngInfo()
    for key, value in metadata.items():
        info.add_text(key, value if isinstance(value, str) else json.dumps(value))
    info.add_text("agentsd", json.dumps(metadata))
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial.png")
    try:
        image.save(partial, pnginfo=info)
        os.replace(partial, path)
    except BaseException:  # Ctrl-C or a full disk: PIL removes its file on an Exception, not on Ctrl-C
        partial.unlink(missing_ok=True)
        raise
