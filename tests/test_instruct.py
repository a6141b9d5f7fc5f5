"""Stage 3 (instruction tuning): the conversation view's exact v1 ids and loss mask, skips and lengths,
packing without leakage, held-out questions, image conversations; the stage's assistant-only loss, init from
a stage-2 export, QA accuracy at validation end, the HF export and VideoChat on it."""

from __future__ import annotations

import csv
import dataclasses
import json
import random
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from datamodules.instruct_views import (
    CONVERSATION_TOO_LONG,
    MISSING_IMAGE,
    NO_CONVERSATION,
    InstructionSequenceView,
    load_image,
)
from datamodules.skip_tracker import SKIPS
from datamodules.token_source import TokenSource
from datamodules.tokenize_shards import TokenizeConfig, run_tokenize
from stages.instruct import InstructStage
from stages.pretrain import PretrainStage
from videolavit.__main__ import main
from videolavit.inference.video_chat import VideoChat, generate_text
from videolavit.llm.conversation import LLAVA_SYSTEM_PROMPT
from videolavit.llm.sequences import IGNORE_INDEX, PAD_DOCUMENT_ID
from videolavit.llm.text_tokenizer import BOS_ID, EOS_ID, build_tiny_tokenizer
from videolavit.llm.token_shards import encode_token_sample
from videolavit.llm.vocabulary import Vocabulary
from tests.stage_configs import write_stage_config
from tests.tensorboard_scalars import scalars
from tests.tiny_tokenizers import build_tokenizer_exports

X = IGNORE_INDEX
# [IMG]=300 [/IMG]=301 keyframe codes 302..306 [MOV]=307 [/MOV]=308 motion codes 309..312
TINY = Vocabulary(text_size=300, visual_codes=5, motion_codes=4)
# Real tokenizers' layout for the stage/chat tests: 16 keyframe codes, 32 motion codes (352 ids)
VOCAB = Vocabulary(text_size=300, visual_codes=16, motion_codes=32)
LLM = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
           max_position_embeddings=512)
VIDEO = [300, 306, 302, 301, 307, 309, 312, 308,   # clip at 12: [IMG] kf 4 0 [/IMG] [MOV] m 0 3 [/MOV]
         300, 303, 301, 307, 311, 311, 308]        # clip at 36: [IMG] kf 1 [/IMG] [MOV] m 2 2 [/MOV]
QUESTIONS = ["What shape is it?", "Which color does the shape have?", "In which direction does the shape move?"]




@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory, synthetic_corpus) -> Path:
    with open(synthetic_corpus / "captions.csv") as handle:
        texts = [row["name"] for row in csv.DictReader(handle)]
    out = tmp_path_factory.mktemp("tokenizer")
    build_tiny_tokenizer(out, texts + QUESTIONS + [LLAVA_SYSTEM_PROMPT, "USER: ASSISTANT: circle red up"],
                         vocab_size=TINY.text_size)
    return out


# ------------------------------------------------------------------------------------------- helpers
def raw_sample(key: str, num_frames: int = 60, vocab: Vocabulary = TINY, keyframes=((4, 0), (1,)),
               motions=((0, 3), (2, 2))) -> dict:
    """A token sample as the tokenize job writes it: clips at 12 and 36 with the golden codes (``VIDEO``)."""
    meta = {"source_id": key, "width": 96, "height": 96, "fps": 6, "num_frames": num_frames,
            "iframes": list(range(0, num_frames, 12))}
    return encode_token_sample(key, "a caption", meta, [12, 36], np.array(motions), [np.array(k) for k in keyframes],
                               "f0", vocab.motion_codes, vocab.visual_codes)


def qa_file(path: Path, videos, answers=("circle", "red", "up")) -> Path:
    items = [{"video_id": v, "question": q, "answer": a, "attribute": attr}
             for v in videos for q, a, attr in zip(QUESTIONS, answers, ("shape", "color", "direction"))]
    path.write_text(json.dumps(items))
    return path


TOKEN_SOURCE_FIELDS = {f.name for f in dataclasses.fields(TokenSource)}


def instruction_view(**kwargs) -> InstructionSequenceView:
    """The view from flat keyword arguments: ``TokenSource`` fields go to ``tokens``, the rest to the view."""
    tokens = TokenSource(**{k: v for k, v in kwargs.items() if k in TOKEN_SOURCE_FIELDS})
    return InstructionSequenceView(tokens, **{k: v for k, v in kwargs.items() if k not in TOKEN_SOURCE_FIELDS})


def token_view(tokenizer_dir, conversations, **kwargs) -> InstructionSequenceView:
    args = dict(tokenizer_path=str(tokenizer_dir), vocabulary=TINY, seq_len=256, conversations=str(conversations),
                open_rows=1)
    return instruction_view(**{**args, **kwargs})


def tokens(view, text: str) -> list[int]:
    return view.tokenizer(text, add_special_tokens=False)["input_ids"]


# ------------------------------------------------------------------------------------------- golden
def test_a_video_question_has_the_exact_v1_ids_and_loss_mask(tokenizer_dir, tmp_path):
    (tmp_path / "qa.json").write_text(json.dumps([{"video_id": "vid_a", "question": QUESTIONS[0],
                                                   "answer": "circle", "attribute": "shape"}]))
    view = token_view(tokenizer_dir, tmp_path / "qa.json", seq_len=200)
    rows = list(view([raw_sample("vid_a")], train=False))
    assert len(rows) == 1
    row = rows[0]

    head = tokens(view, LLAVA_SYSTEM_PROMPT + " USER: ")
    question = tokens(view, f"\n{QUESTIONS[0]} ASSISTANT:")
    answer = tokens(view, " circle")
    # The run after the video is tokenized as one string; with this byte-level BPE it splits at the colon.
    assert tokens(view, f"\n{QUESTIONS[0]} ASSISTANT: circle") == question + answer
    ids = [BOS_ID, *head, *VIDEO, *question, *answer, EOS_ID]
    n = len(ids)
    assert row.input_ids[:n].tolist() == ids
    assert row.labels[:n].tolist() == [X] * (1 + len(head) + len(VIDEO) + len(question)) + answer + [EOS_ID]
    assert row.input_ids[n:].tolist() == [view.tokenizer.pad_token_id] * (200 - n)
    assert row.labels[n:].tolist() == [X] * (200 - n)
    assert row.position_ids.tolist() == list(range(n)) + list(range(200 - n))
    assert row.document_ids.tolist() == [0] * n + [PAD_DOCUMENT_ID] * (200 - n)

    batch = view.collate(rows)
    assert {"input_ids", "labels", "position_ids", "document_ids", "modality", "cu_seqlens", "max_seqlen"} <= set(batch)
    assert batch["cu_seqlens"].tolist() == [0, n, 200]
    (q,) = batch["questions"]
    assert q["prompt_ids"] == ids[: n - len(answer) - 1]  # the prompt ends at "ASSISTANT:"
    assert (q["answer"], q["attribute"], q["video"], q["question"]) == ("circle", "shape", "vid_a", QUESTIONS[0])
    assert "questions" not in view.collate(list(view([raw_sample("vid_a")], train=True)))


def test_videos_without_conversations_are_counted_skips(tokenizer_dir, tmp_path):
    view = token_view(tokenizer_dir, qa_file(tmp_path / "qa.json", ["vid_a", "vid_c"]))
    SKIPS.start_stream()
    rows = list(view([raw_sample("vid_a"), raw_sample("vid_b"), raw_sample("vid_c")], train=False))
    assert SKIPS.counts == Counter({NO_CONVERSATION: 1})
    assert sum(r.num_documents for r in rows) == 6  # 2 videos x 3 questions, each its own conversation
    assert sorted(q["video"] for r in rows for q in r.questions) == ["vid_a"] * 3 + ["vid_c"] * 3


@pytest.mark.parametrize("overlong", ["skip", "truncate"])
def test_conversations_longer_than_a_row_are_skipped_or_truncated(tokenizer_dir, tmp_path, overlong):
    qa = tmp_path / "qa.json"
    qa.write_text(json.dumps([{"video_id": "vid_a", "question": QUESTIONS[0], "answer": "circle"},
                              {"video_id": "vid_a", "question": QUESTIONS[0], "answer": " ".join(["up"] * 80)}]))
    view = token_view(tokenizer_dir, qa, overlong=overlong)
    short = view.template.encode(view.video_conversations(view.video_index(False)["vid_a"], False,
                                                          random.Random(0))[0], view.tokenizer, [VIDEO])
    view.seq_len = len(short) + 10  # the short conversation fits, the long one does not
    SKIPS.start_stream()
    rows = list(view([raw_sample("vid_a")], train=False))
    docs = [(r, d) for r in rows for d in range(r.num_documents)]
    if overlong == "skip":
        assert SKIPS.counts == Counter({CONVERSATION_TOO_LONG: 1}) and len(docs) == 1
    else:
        assert not SKIPS.counts and len(docs) == 2 and view.instruct_stats.truncated == 1
        cut = next(r for r in rows if (r.document_ids == PAD_DOCUMENT_ID).sum() == 0)  # fills its row exactly
        assert (cut.labels[1:] != X).any()  # part of the long answer is still a target


def test_a_stream_where_no_conversation_fits_is_a_configuration_error(tokenizer_dir, tmp_path):
    keys = [f"v{i:02d}" for i in range(25)]  # 75 conversations, none fits in 40 tokens
    view = token_view(tokenizer_dir, qa_file(tmp_path / "qa.json", keys),
                     seq_len=40)
    with pytest.raises(ValueError, match="all longer than seq_len=40"):
        list(view([raw_sample(k) for k in keys], train=True))


def test_merged_turns_give_one_conversation_per_video_and_packing_does_not_leak(tokenizer_dir, tmp_path):
    keys = ["vid_a", "vid_b"]
    qa = qa_file(tmp_path / "qa.json", keys)
    separate = token_view(tokenizer_dir, qa, seq_len=400, open_rows=2)
    merged = token_view(tokenizer_dir, qa, seq_len=400, open_rows=2, turns="merged")
    samples = [raw_sample(k) for k in keys]

    rows = list(separate(samples, train=True, rng=random.Random(0)))
    docs = [(r, d) for r in rows for d in range(r.num_documents)]
    assert len(docs) == 6 and len(rows) < 6  # packed: several conversations per row
    for row, d in docs:
        ids = row.input_ids[row.document_ids == d].tolist()
        assert ids[0] == BOS_ID and ids.count(TINY.image_start_id) == 2 and ids[-1] == EOS_ID
        assert row.position_ids[row.document_ids == d].tolist() == list(range(len(ids)))  # restarts: no leakage
        assert row.labels[row.document_ids == d][0] == X

    rows = list(merged(samples, train=True, rng=random.Random(0)))
    docs = [row.input_ids[row.document_ids == d].tolist() for row in rows for d in range(row.num_documents)]
    assert len(docs) == 2
    for ids in docs:
        assert ids.count(TINY.image_start_id) == 2  # the video once
        assert ids.count(EOS_ID) == 3  # three answered turns
    items = merged.video_index(True)["vid_a"]
    first_questions = {merged.video_conversations(items, True, random.Random(s))[0][0].text for s in range(8)}
    assert len(first_questions) > 1  # turn order is shuffled in training
    assert merged.video_conversations(items, False, random.Random(0))[0][0].text == f"<video>\n{QUESTIONS[0]}"


def test_every_validation_question_travels_in_exactly_one_batch(tokenizer_dir, tmp_path):
    keys = [f"v{i:02d}" for i in range(7)]
    view = token_view(tokenizer_dir, qa_file(tmp_path / "qa.json", keys),
                     seq_len=200, open_rows=3)
    rows = list(view([raw_sample(k) for k in keys], train=False))
    batches = [view.collate(rows[i:i + 2]) for i in range(0, len(rows), 2)]
    ids = [q["id"] for b in batches for q in b["questions"]]
    assert len(ids) == len(set(ids)) == 21


# ------------------------------------------------------------------------------------------- images
@pytest.fixture(scope="module")
def tokenizer_exports(tmp_path_factory) -> Path:
    """Random tiny motion (32 codes) and keyframe (16 codes, 56 px) tokenizer exports for VOCAB."""
    return build_tokenizer_exports(tmp_path_factory.mktemp("exports"))


@pytest.fixture(scope="module")
def token_shards(prepared_shards, tokenizer_exports, tmp_path_factory) -> Path:
    """The prepared corpus tokenised with ``tokenizer_exports`` (what the stage reads)."""
    out = tmp_path_factory.mktemp("tokens")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run_tokenize(TokenizeConfig(shards=str(prepared_shards), exports=str(tokenizer_exports), out=str(out),
                                    progress=False))
    return out


def write_png(path: Path, height: int = 40, width: int = 70) -> Path:
    import av

    yy, xx = np.mgrid[0:height, 0:width]
    pixels = np.stack([xx * 3 % 256, yy * 5 % 256, (xx + yy) % 256], -1).astype(np.uint8)
    with av.open(str(path), mode="w", format="image2") as container:
        stream = container.add_stream("png")
        stream.width, stream.height, stream.pix_fmt = width, height, "rgb24"
        for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
            container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return path


def test_image_conversations_are_tokenised_by_the_keyframe_tokenizer_and_mixed_in(tokenizer_dir, tokenizer_exports,
                                                                                  tmp_path):
    from videolavit.models.keyframe_tokenizer_export import load_keyframe_tokenizer

    (tmp_path / "images").mkdir()
    write_png(tmp_path / "images" / "cat.png")
    llava = [{"id": "img1", "image": "cat.png", "conversations": [
                 {"from": "human", "value": "What is in the image?\n<image>"},
                 {"from": "gpt", "value": "a red circle"}]},
             {"id": "txt1", "conversations": [{"from": "human", "value": "Say up."}, {"from": "gpt", "value": "up"}]},
             {"id": "gone", "image": "missing.png", "conversations": [
                 {"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "red"}]}]
    (tmp_path / "llava.json").write_text(json.dumps(llava))
    view = instruction_view(
        tokenizer_path=str(tokenizer_dir), vocabulary=VOCAB, seq_len=256,
        conversations=str(qa_file(tmp_path / "qa.json", ["x"])),
        val_image_conversations=str(tmp_path / "llava.json"), image_root=str(tmp_path / "images"),
        weights={"video": 1.0, "image": 1.0}, tokenizer_exports=str(tokenizer_exports))
    SKIPS.start_stream()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        docs = list(view.documents([], train=False, rng=random.Random(0)))
        model = load_keyframe_tokenizer(tokenizer_exports).eval()
    assert SKIPS.counts == Counter({MISSING_IMAGE: 1})
    assert len(docs) == 2
    image_doc = next(d for d in docs if VOCAB.image_start_id in d.input_ids)
    text_doc = next(d for d in docs if VOCAB.image_start_id not in d.input_ids)
    assert [t for t in image_doc.labels if t != X] == tokens(view, " a red circle") + [EOS_ID]  # answer only
    assert [t for t in text_doc.labels if t != X] == tokens(view, " up") + [EOS_ID]

    # with a deterministic patch selection, the image block is exactly the keyframe tokenizer's codes
    model.config.eval_selection = "threshold"
    view.image_coder.keyframe_tokenizer().config.eval_selection = "threshold"
    with torch.no_grad():
        ids, lengths = model.tokenize(load_image(tmp_path / "images" / "cat.png", 56)[None])
    again = next(d for d in view.documents([], train=False, rng=random.Random(0))
                 if VOCAB.image_start_id in d.input_ids)
    start, end = again.input_ids.index(VOCAB.image_start_id), again.input_ids.index(VOCAB.image_end_id)
    assert again.input_ids[start + 1:end] == [VOCAB.visual_offset + int(i) for i in ids[0, :lengths[0]]]


def test_load_image_resizes_and_centre_crops(tmp_path):
    image = load_image(write_png(tmp_path / "a.png", height=40, width=70), 32)
    assert image.shape == (3, 32, 32) and 0.0 <= float(image.min()) and float(image.max()) <= 1.0
    (tmp_path / "bad.png").write_bytes(b"not an image at all")
    with pytest.raises(Exception, match="unreadable_image"):
        load_image(tmp_path / "bad.png", 32)


# ------------------------------------------------------------------------------------------- the stage
def build_pretrain_export(tokenizer_dir: Path, out: Path, seed: int = 3) -> Path:
    """A tiny stage-2 export (random weights) in the layout InstructStage starts from."""
    torch.manual_seed(seed)
    PretrainStage(tokenizer_path=str(tokenizer_dir), vocabulary=VOCAB, llm_config=LLM).export(out)
    return out


@pytest.fixture(scope="module")
def pretrain_export(tokenizer_dir, tmp_path_factory) -> Path:
    return build_pretrain_export(tokenizer_dir, tmp_path_factory.mktemp("pretrain") / "export")


def stage_batch(tokenizer_dir, tmp_path, vocab=VOCAB) -> dict:
    view = instruction_view(tokenizer_path=str(tokenizer_dir), vocabulary=vocab, seq_len=256,
                            conversations=str(qa_file(tmp_path / "qa.json", ["vid_a", "vid_b"])))
    samples = [raw_sample(k, vocab=vocab, keyframes=((1, 2), (1, 2)), motions=((1, 2), (1, 2)))
               for k in ("vid_a", "vid_b")]
    return view.collate(list(view(samples, train=False)))


def test_init_from_a_stage2_export_takes_its_weights_tokenizer_and_vocabulary(pretrain_export):
    stage = InstructStage(init_from=str(pretrain_export))
    assert not stage.is_materialized()  # built on the meta device: weights load in configure_model
    stage.configure_model()  # what the trainer does (no device mesh: the whole model on CPU)
    assert stage.vocabulary == VOCAB and len(stage.tokenizer) == VOCAB.text_size + 4  # text ids + the block markers
    assert stage.tokenizer.convert_tokens_to_ids(["[IMG]", "[/IMG]", "[MOV]", "[/MOV]"]) == list(VOCAB.special_ids)
    source = AutoModelForCausalLM.from_pretrained(pretrain_export, local_files_only=True)
    assert torch.equal(stage.llm.model.embed_tokens.weight, source.model.embed_tokens.weight)
    assert torch.equal(stage.llm.model.layers[1].mlp.down_proj.weight, source.model.layers[1].mlp.down_proj.weight)
    assert stage.llm.training  # from_pretrained hands back eval mode; activation checkpointing needs train mode

    with pytest.raises(ValueError, match="needs init_from"):
        InstructStage()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        InstructStage(init_from="/nonexistent/export")


def test_init_from_another_export_replaces_the_construction_weights(tokenizer_dir, pretrain_export, tmp_path):
    other = build_pretrain_export(tokenizer_dir, tmp_path / "other", seed=9)
    stage = InstructStage(llm_path=str(pretrain_export), init_from=str(other))
    stage.load_init_from(str(other))  # what setup() does at the start of a new run
    stage.configure_model()  # then the trainer's configure_model loads it
    source = AutoModelForCausalLM.from_pretrained(other, local_files_only=True)
    assert torch.equal(stage.llm.lm_head.weight, source.lm_head.weight)


def test_the_loss_is_taken_on_assistant_tokens_only(tokenizer_dir, pretrain_export, tmp_path):
    stage = InstructStage(init_from=str(pretrain_export)).eval()
    stage.configure_model()
    batch = stage_batch(tokenizer_dir, tmp_path)
    answer_ids = {i for a in ("circle", "red", "up")
                  for i in stage.tokenizer(" " + a, add_special_tokens=False)["input_ids"]}
    targets = batch["labels"][batch["labels"] != X]
    assert set(targets.tolist()) <= answer_ids | {EOS_ID} and (targets == EOS_ID).sum() == 6  # 6 answers

    with torch.no_grad():
        logits = stage(batch["input_ids"], batch["position_ids"])
    held = logits.clone().requires_grad_(True)
    stage.forward = lambda input_ids, position_ids: held  # the loss on exactly these logits
    ce, valid, _ = stage.token_losses(batch)
    loss = ce.sum() / valid.sum()
    loss.backward()
    predicts_target = torch.zeros_like(batch["labels"], dtype=torch.bool)
    predicts_target[:, :-1] = batch["labels"][:, 1:] != X
    touched = held.grad.abs().sum(-1) > 0
    assert torch.equal(touched, predicts_target)  # no gradient from system, user, video or padding positions

    # perturbing the predictions at a user-turn position leaves the loss as it is; at an answer it does not
    user = int((~predicts_target[0]).nonzero()[5])
    answer = int(predicts_target[0].nonzero()[0])
    for position, changes in ((user, False), (answer, True)):
        perturbed = logits.clone()
        perturbed[0, position] = torch.randn_like(perturbed[0, position]) * 5
        stage.forward = lambda input_ids, position_ids, p=perturbed: p
        ce2, valid2, _ = stage.token_losses(batch)
        assert (abs(float(ce2.sum() / valid2.sum()) - float(loss.detach())) > 1e-6) == changes


def test_answers_are_text_only_and_scored_by_exact_match(pretrain_export, tokenizer_dir, tmp_path):
    stage = InstructStage(init_from=str(pretrain_export), qa_max_new_tokens=3)
    stage.configure_model()
    batch = stage_batch(tokenizer_dir, tmp_path)
    questions = batch["questions"]
    with torch.no_grad():
        outs = generate_text(stage.llm.eval(), [q["prompt_ids"] for q in questions], vocabulary=VOCAB,
                             eos_id=EOS_ID, pad_id=stage.tokenizer.pad_token_id, max_new_tokens=3)
    assert all(0 <= i < VOCAB.text_size and i != EOS_ID for ids in outs for i in ids)
    preds = {q["id"]: stage.tokenizer.decode(ids, skip_special_tokens=True).strip() for q, ids in zip(questions, outs)}
    score, answers = stage.answer_questions(questions)
    assert {a["id"]: a["pred"] for a in answers} == preds  # batched: the same greedy answers
    expected = sum(preds[q["id"]].lower() == q["answer"] for q in questions)
    assert score.total == 6 and score.correct == expected
    assert set(score.attribute_accuracy()) == {"shape", "color", "direction"}


def test_left_padded_batched_decoding_equals_one_prompt_at_a_time(pretrain_export):
    model = AutoModelForCausalLM.from_pretrained(pretrain_export, local_files_only=True).eval()
    prompts = [[1, 5, 6, 7, 8, 9, 10], [1, 20, 21], [1, 30, 31, 32, 33]]
    together = generate_text(model, prompts, vocabulary=VOCAB, eos_id=EOS_ID, pad_id=0, max_new_tokens=5)
    alone = [generate_text(model, [p], vocabulary=VOCAB, eos_id=EOS_ID, pad_id=0, max_new_tokens=5)[0] for p in prompts]
    assert together == alone
    with torch.no_grad():  # the first greedy token is the argmax over text ids of the plain forward
        logits = model(torch.tensor([prompts[0]])).logits[0, -1, :VOCAB.text_size]
    assert together[0][:1] == [int(logits.argmax())] or int(logits.argmax()) == EOS_ID


# ------------------------------------------------------------------------------------------- CLI + export + chat
def write_config(root: Path, shards: Path, corpus: Path, export: Path, exports: Path, **trainer) -> Path:
    view = {"tokens": {"tokenizer_path": str(export), "tokenizer_exports": str(exports)},
            "conversations": str(corpus / "qa.json")}
    return write_stage_config("instruct", root, shards, {
        "model": {"init_args": {"init_from": str(export), "llm_path": str(export)}},
        "data": {"init_args": {"view": {"init_args": view}}}}, trainer=trainer)


def test_tiny_fit_logs_qa_accuracy_exports_resumes_and_video_chat_answers(token_shards, synthetic_corpus,
                                                                          pretrain_export, tokenizer_exports,
                                                                          tmp_path):
    config = write_config(tmp_path, token_shards, synthetic_corpus, pretrain_export, tokenizer_exports)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["fit", "--config", str(config)]) == 0
    logged = scalars(tmp_path / "logs")
    assert {"train/loss", "val/loss", "val/qa_accuracy", "val/qa_accuracy_shape", "val/qa_accuracy_color",
            "val/qa_accuracy_direction"} <= set(logged), sorted(logged)
    assert [v for _, v in logged["val/qa_questions"]] == [6.0]
    assert all(0.0 <= v <= 1.0 for _, v in logged["val/qa_accuracy"])

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "export", local_files_only=True)
    assert model.config.vocab_size == VOCAB.size
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 3

    with warnings.catch_warnings():  # resume: llm_path builds the model, the checkpoint restores the run
        warnings.simplefilter("ignore")
        assert main(["fit", "--config", str(config), "--ckpt_path", "last", "--model.init_args.init_from", "null",
                     "--trainer.max_steps", "6"]) == 0
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 6
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        chat = VideoChat(tmp_path / "export", tokenizer_exports)
        video = sorted((synthetic_corpus / "videos").glob("*.mp4"))[0]
        ids = chat.video_ids(video)
        answer = chat.answer(video, "What shape is it?", max_new_tokens=3)
        assert chat.answer(video.read_bytes(), "What shape is it?", max_new_tokens=3) == answer  # reproducible
    assert isinstance(answer, str)
    assert ids.count(VOCAB.image_start_id) == ids.count(VOCAB.motion_start_id) == 2  # 2 clips, as prepare takes
    assert sum(1 for i in ids if i in VOCAB.motion_range) == 2 * 16  # 24x8x8 -> 4x2x2 motion codes per clip


@pytest.mark.slow  # two spawned processes
def test_model_parallel_fit_answers_the_same_questions_on_every_rank(token_shards, synthetic_corpus,
                                                                    pretrain_export, tokenizer_exports, tmp_path):
    """FSDP2 (ModelParallelStrategy, gloo on CPU) with activation checkpointing: the QA evaluation gathers the
    questions of both ranks and decodes them in lockstep (a rank that stopped early would hang the other)."""
    import os
    import subprocess
    import sys

    config = write_config(tmp_path, token_shards, synthetic_corpus, pretrain_export, tokenizer_exports, devices=2,
                          limit_val_batches=1,
                          strategy={"class_path": "lightning.pytorch.strategies.ModelParallelStrategy",
                                    "init_args": {"data_parallel_size": 2, "tensor_parallel_size": 1}})
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "videolavit", "fit", "--config", str(config),
                           "--model.init_args.activation_checkpointing", "true"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    logged = scalars(tmp_path / "logs")
    assert [v for _, v in logged["val/qa_questions"]] == [6.0]  # both ranks' questions, the first 6 by id
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "export", local_files_only=True)
    assert model.config.vocab_size == VOCAB.size
