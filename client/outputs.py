"""Where the CLI puts what a job streams back: the result, every frame, and an animation of the frames."""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image

from stylize_service.client.formats import extension_for_mime
from stylize_service.protos.stylize.v1 import stylize_pb2 as pb

ANIMATION_SUFFIXES = (".gif", ".webp")  # the animated formats that Pillow writes


class JobOutputs:
    """Collects one job's frames (written at once to frames_dir, kept for the animation) and writes
    the result and the animation at the end."""

    def __init__(self, frames_dir: Path | None, animation: Path | None, frame_duration_ms: int = 100) -> None:
        self.frames_dir = frames_dir
        self.animation = animation
        self.frame_duration_ms = frame_duration_ms
        self._frames: list[bytes] = []
        self._iterations: set[int] = set()  # the frames kept, by iteration
        if frames_dir is not None:
            frames_dir.mkdir(parents=True, exist_ok=True)

    def on_frame(self, frame: pb.Frame) -> None:
        """Write and keep a frame, unless one of its iteration came already: a job resumed from a
        checkpoint after a server restart runs the iterations since the checkpoint again, and may send
        their frames again (with new sequence numbers)."""
        if frame.iteration in self._iterations:
            return
        self._iterations.add(frame.iteration)
        if self.frames_dir is not None:
            path = self.frames_dir / f"frame-{frame.iteration:06d}.{extension_for_mime(frame.mime_type)}"
            path.write_bytes(frame.image)
        if self.animation is not None:
            self._frames.append(frame.image)

    def write_result(self, result: pb.Result, output: Path) -> None:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_bytes(result.image)
        if self.animation is not None:
            self._write_animation(result)

    def _write_animation(self, result: pb.Result) -> None:
        assert self.animation is not None
        images = [_open(data) for data in self._frames]
        final = _open(result.image)
        if images and final.size != images[0].size:
            final = final.resize(images[0].size, Image.Resampling.LANCZOS)
        images.append(final)  # end on the result, held longer
        durations = [self.frame_duration_ms] * (len(images) - 1) + [self.frame_duration_ms * 10]
        self.animation.parent.mkdir(parents=True, exist_ok=True)
        fmt = "GIF" if self.animation.suffix.lower() == ".gif" else "WEBP"
        images[0].save(
            self.animation,
            fmt,
            save_all=True,
            append_images=images[1:],
            duration=durations,
            loop=0,
        )


def _open(data: bytes) -> Image.Image:
    with Image.open(io.BytesIO(data)) as image:
        return image.convert("RGB")
