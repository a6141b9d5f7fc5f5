"""Fine-tuning from an imported release: stage 3 on the continuous keyframe path from ``language_model_sft/``
(what it trains and freezes, its export, chat from that export), and the stages' ``init_from`` of the imports."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
import yaml

from tests.release_fixtures import exports, release  # noqa: F401  (module fixtures, rebuilt for this module)
from videolavit.__main__ import main


def continuous_view(exports: Path, corpus: Path, **kwargs):
    from datamodules.continuous_instruct_views import ContinuousInstructionView

    sft = exports / "instruct"
    return ContinuousInstructionView(tokenizer_path=str(sft), tokenizer_exports=str(sft), seq_len=1024,
                                     conversations=str(corpus / "qa.json"), template="video_lavit_release", **kwargs)


def test_the_continuous_view_gives_slots_images_and_assistant_labels(exports, synthetic_corpus, prepared_shards):
    from datamodules.tar_reader import iter_tar_samples
    from videolavit.llm.keyframe_features import KEYFRAME_SLOT_ID
    from videolavit.llm.sequences import IGNORE_INDEX

    view = continuous_view(exports, synthetic_corpus)
    raw = [s for shard in sorted(prepared_shards.glob("*.tar")) for s in iter_tar_samples(str(shard))][:2]
    rows = list(view(raw, train=True))
    assert len(rows) == 6  # 2 videos x 3 questions, one conversation per row
    batch = view.collate(rows[:3])
    assert batch["keyframe_counts"].tolist() == [2, 2, 2]  # 2 clips per video
    assert batch["keyframe_images"].shape == (6, 3, 28, 28)
    slots = batch["input_ids"] == KEYFRAME_SLOT_ID
    assert (batch["labels"][slots] == IGNORE_INDEX).all()
    assert ((batch["labels"] != IGNORE_INDEX).sum(dim=1) > 0).all()
    assert batch["input_ids"].shape[1] == int(batch["row_lengths"].max())


def write_config(root: Path, shards: Path, corpus: Path, exports: Path, steps: int = 2) -> Path:
    sft = str(exports / "instruct")
    config = {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "devices": 1, "precision": "32-true", "max_steps": steps,
                    "val_check_interval": steps, "check_val_every_n_epoch": None, "log_every_n_steps": 1,
                    "num_sanity_val_steps": 0, "enable_progress_bar": False, "enable_model_summary": False,
                    "limit_val_batches": 1, "logger": False, "default_root_dir": str(root),
                    "callbacks": [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                                   "init_args": {"dirpath": str(root / "checkpoints"), "save_last": True,
                                                 "every_n_train_steps": steps}}]},
        "model": {"class_path": "stages.instruct.InstructStage",
                  "init_args": {"init_from": sft, "qa_eval_questions": 2, "qa_max_new_tokens": 2,
                                "optimizer": {"lr": 1e-2}, "export_dir": str(root / "export"),
                                "chat_template": "video_lavit_release"}},
        "data": {"class_path": "datamodules.video_datamodule.VideoDataModule",
                 "init_args": {"train_shards": str(shards), "val_shards": str(shards),
                               "view": {"class_path": "datamodules.continuous_instruct_views.ContinuousInstructionView",
                                        "init_args": {"tokenizer_path": sft, "tokenizer_exports": sft,
                                                      "seq_len": 1024, "template": "video_lavit_release",
                                                      "conversations": str(corpus / "qa.json")}},
                               "batch_size": 2, "samples_per_epoch": 16, "shuffle_buffer": 4, "num_workers": 0}},
    }
    root.mkdir(parents=True, exist_ok=True)
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def test_instruction_tuning_from_the_imported_sft_model_trains_the_merger_and_vit_proj(
        exports, synthetic_corpus, prepared_shards, tmp_path):
    from videolavit.inference.video_chat import VideoChat
    from videolavit.llm.keyframe_features import read_keyframe_input
    from videolavit.models.keyframe_tokenizer_export import load_keyframe_tokenizer

    config = write_config(tmp_path, prepared_shards, synthetic_corpus, exports)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["fit", "--config", str(config)]) == 0
    export = tmp_path / "export"
    assert read_keyframe_input(export) == "continuous"
    before = load_keyframe_tokenizer(exports / "instruct").state_dict()
    after = load_keyframe_tokenizer(export).state_dict()
    changed = {k.split(".")[0] for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"causal_encoder", "vit_proj"}  # the ViT, selector and codebook heads stay frozen
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    kept = {k.split(".")[1] for k in checkpoint["state_dict"] if k.startswith("keyframe_encoder.")}
    assert kept == {"causal_encoder", "vit_proj"}  # frozen parts are not checkpointed
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["fit", "--config", str(config), "--ckpt_path", "last", "--model.init_args.init_from", "null",
                     "--model.init_args.llm_path", str(exports / "instruct"), "--trainer.max_steps", "3"]) == 0
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 3
    chat = VideoChat(export, exports, template="video_lavit_release")
    video = sorted((synthetic_corpus / "videos").glob("*.mp4"))[0]
    assert isinstance(chat.answer(video, "What shape is it?", max_new_tokens=9), str)
