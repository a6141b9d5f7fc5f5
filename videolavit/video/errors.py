"""Named reasons for which a video is skipped.

Bad input never stops a job: decomposition raises ``VideoSkip`` with one of these reasons, the
caller counts it and moves on, and the manifest reports the counts by reason.
"""

from __future__ import annotations

EMPTY_FILE = "empty_file"
UNREADABLE = "unreadable"  # not a media file, or a container/codec FFmpeg cannot open
NO_VIDEO_STREAM = "no_video_stream"  # e.g. audio-only files
DECODE_ERROR = "decode_error"  # the stream breaks before one full clip could be decoded
TOO_SMALL = "too_small"  # shorter side below the minimum
TOO_SHORT = "too_short"  # no full 24-frame clip starting at an I-frame
MISSING_CAPTION = "missing_caption"
CORRUPT_SAMPLE = "corrupt_sample"  # a shard member that cannot be parsed at read time
TRUNCATED_SHARD = "truncated_shard"  # a tar that ends early at read time

REASONS = (EMPTY_FILE, UNREADABLE, NO_VIDEO_STREAM, DECODE_ERROR, TOO_SMALL, TOO_SHORT, MISSING_CAPTION,
           CORRUPT_SAMPLE, TRUNCATED_SHARD)


class VideoSkip(Exception):
    """A video (or sample) that cannot be used, with a machine-readable reason and a human detail."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail
