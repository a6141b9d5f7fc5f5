"""The one DataModule: views, worker/rank splitting, epochs, global batch, skipped samples."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch

from datamodules.skip_tracker import SKIPS_KEY
from datamodules.video_datamodule import VideoDataModule
from datamodules.views import KeyframeView, MotionView, SampleView, VideoView, build_view
from videolavit.video import errors


def _val_keys(dm: VideoDataModule) -> list[tuple[str, int]]:
    keys = []
    for batch in dm.val_dataloader():
        dm.on_before_batch_transfer(batch, 0)
        keys += list(zip(batch["key"], batch["clip_start"].tolist()))
    return keys


def test_two_workers_deliver_every_sample_once(prepared_shards):
    dm = VideoDataModule(val_shards=str(prepared_shards), view="motion", batch_size=3, num_workers=2)
    keys = _val_keys(dm)
    assert len(keys) == len(set(keys)) == 16  # 8 videos × 2 clips
    assert len({k for k, _ in keys}) == 8
    assert _val_keys(dm) == keys  # deterministic order


@pytest.mark.parametrize("shards_used", [4, 1])
def test_two_ranks_see_disjoint_data(prepared_shards, tmp_path, shards_used):
    manifest = json.loads((prepared_shards / "manifest.json").read_text())
    shards = [str(prepared_shards / name) for name in manifest["shards"][:shards_used]]
    seen = []
    for rank in range(2):
        dm = VideoDataModule(val_shards=shards, view="motion", batch_size=2, num_workers=2)
        dm.rank, dm.world_size = rank, 2
        seen.append(set(_val_keys(dm)))
    assert seen[0] and seen[1] and not seen[0] & seen[1]
    assert len(seen[0] | seen[1]) == 4 * shards_used  # 2 videos × 2 clips per shard


def test_global_batch_is_divided_by_world_size_and_accumulation():
    dm = VideoDataModule(batch_size=32)
    dm.world_size, dm.accumulate = 4, 2
    assert dm.per_device_batch_size(32) == 4
    assert dm.per_device_batch_size(32, training=False) == 8
    with pytest.raises(ValueError, match="not divisible by world size 4 × accumulate_grad_batches 2"):
        dm.per_device_batch_size(36)


def test_training_epochs_are_resampled_and_sized(prepared_shards):
    dm = VideoDataModule(train_shards=str(prepared_shards), view="motion", batch_size=4, samples_per_epoch=24,
                         num_workers=2, shuffle_buffer=8)
    loader = dm.train_dataloader()
    batches = list(loader)
    assert len(batches) == len(loader) == 6
    assert all(b["motion"].shape == (4, 2, 24, 20, 36) for b in batches)
    keys = [k for b in batches for k in b["key"]]
    assert len(set(keys)) > 2  # drawn across shards, not one shard repeated


def test_views_shapes_and_contents(prepared_shards):
    def first(view):
        dm = VideoDataModule(val_shards=str(prepared_shards), view=view, batch_size=2, num_workers=0)
        return next(iter(dm.val_dataloader()))

    motion = first(MotionView(grid=(16, 16), scale=1.0))
    assert motion["motion"].shape == (2, 2, 24, 16, 16) and motion["motion"].dtype == torch.float32
    assert motion["motion"].abs().sum() > 0
    video = first(VideoView(frame_size=(64, 48), grid=(16, 16), clips_per_video="all"))
    assert video["frames"].shape == (2, 24, 3, 64, 48) and video["frames"].dtype == torch.uint8
    assert torch.equal(video["keyframe"], video["frames"][:, 0])
    assert video["key"] == motion["key"] and torch.equal(video["clip_start"], motion["clip_start"])
    assert isinstance(video["caption"][0], str) and video["caption"][0]
    image = first(KeyframeView(image_size=32))
    assert image["image"].shape == (2, 3, 32, 32)
    # The keyframe image is the clip's first frame, resized: compare with a direct decode.
    assert (image["image"].float().mean() - video["keyframe"].float().mean()).abs() < 20
    with pytest.raises(ValueError, match="built-in views"):
        build_view("tokens")


def test_broken_shards_and_samples_are_skipped_counted_and_logged(prepared_shards, tmp_path, caplog):
    manifest = json.loads((prepared_shards / "manifest.json").read_text())
    shards = []
    for index, name in enumerate(manifest["shards"]):
        target = tmp_path / name
        shutil.copy(prepared_shards / name, target)
        shards.append(str(target))
    data = open(shards[1], "rb").read()
    open(shards[1], "wb").write(data[: len(data) // 2])  # truncated shard: second sample cut
    dm = VideoDataModule(val_shards=shards, view="motion", batch_size=2, num_workers=2)
    videos = {k for k, _ in _val_keys(dm)}
    assert len(videos) == 7  # every intact sample arrives
    assert dm.skipped == {errors.TRUNCATED_SHARD: 1}  # counted across worker processes
    in_process = VideoDataModule(val_shards=shards[1:2], view="motion", batch_size=2, num_workers=0)
    with caplog.at_level(logging.WARNING, logger="datamodules.skips"):
        assert len({k for k, _ in _val_keys(in_process)}) == 1
    assert f"{shards[1]}:after " in caplog.text and errors.TRUNCATED_SHARD in caplog.text


def test_corrupt_sample_is_skipped_with_its_key(caplog):
    view = MotionView()
    raw = {"__key__": "broken_one", "txt": b"x", "json": b"{not json", "motion.npy": b"", "mp4": b""}
    with caplog.at_level(logging.WARNING, logger="datamodules.skips"):
        assert list(view([raw])) == []
    assert "broken_one" in caplog.text and errors.CORRUPT_SAMPLE in caplog.text
    batch = view.collate([{"motion": torch.zeros(2), "key": "k"}])
    assert batch[SKIPS_KEY]["counts"][errors.CORRUPT_SAMPLE] >= 1


def test_custom_view_extension_point(prepared_shards):
    class CaptionLengths(SampleView):
        need_video = False

        def __call__(self, samples, train=False, rng=None):
            for sample in super().__call__(samples, train, rng):
                yield sample

        def examples(self, sample, train, rng):
            yield {"length": torch.tensor(len(sample["caption"])), "key": sample["key"]}

    dm = VideoDataModule(val_shards=str(prepared_shards), view=CaptionLengths(), batch_size=8, num_workers=0)
    batch = next(iter(dm.val_dataloader()))
    assert batch["length"].shape == (8,) and (batch["length"] > 5).all()


def test_pipe_urls_stream_shards(prepared_shards):
    """Object storage is read through ``pipe:`` commands (e.g. ``pipe:aws s3 cp s3://… -``)."""
    manifest = json.loads((prepared_shards / "manifest.json").read_text())
    urls = [f"pipe:cat {prepared_shards / name}" for name in manifest["shards"]]
    dm = VideoDataModule(val_shards=urls, view="motion", batch_size=4, num_workers=2)
    assert len(set(_val_keys(dm))) == 16 and dm.skipped == {}
    broken = VideoDataModule(val_shards=["pipe:cat /nonexistent/shard.tar"] + urls[:1], view="motion", batch_size=4,
                             num_workers=0)
    assert len(_val_keys(broken)) == 4 and broken.skipped == {errors.TRUNCATED_SHARD: 1}
