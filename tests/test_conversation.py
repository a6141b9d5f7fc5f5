"""The LLaVA v1 template: exact rendering, exact ids and mask, loss only on assistant turns, readers."""

import json

import pytest

from videolavit.llm.conversation import (
    LLAVA_V1,
    VIDEO_LAVIT_RELEASE,
    ConversationTemplate,
    Message,
    read_llava_conversations,
    read_synthetic_qa,
    read_video_qa,
)
from videolavit.llm.sequences import IGNORE_INDEX, video_token_ids
from videolavit.llm.text_tokenizer import TokenizerMismatchError, build_tiny_tokenizer, load_text_tokenizer
from videolavit.llm.vocabulary import Vocabulary

X = IGNORE_INDEX
CORPUS = ["A chat between a curious user and an artificial intelligence assistant.",
          "USER: What colour is the circle? ASSISTANT: It is red.", "Where does it move? Left."] * 4
QA = [Message("user", "<video>\nWhat colour is the circle?"), Message("assistant", "It is red."),
      Message("user", "Where does it move?"), Message("assistant", "Left.")]


@pytest.fixture(scope="module")
def byte_tokenizer(tmp_path_factory):
    """No merges: every byte is one token (printable ASCII c -> ord(c) - 30, space 223, newline 201)."""
    directory = tmp_path_factory.mktemp("bytes")
    build_tiny_tokenizer(directory, ["x"], vocab_size=259)
    return load_text_tokenizer(directory, Vocabulary(text_size=259))


@pytest.fixture(scope="module")
def bpe_tokenizer(tmp_path_factory):
    directory = tmp_path_factory.mktemp("bpe")
    build_tiny_tokenizer(directory, CORPUS, vocab_size=384)
    return load_text_tokenizer(directory, Vocabulary(text_size=384))


def test_render_llava_v1_golden():
    assert LLAVA_V1.render(QA) == (
        "A chat between a curious user and an artificial intelligence assistant. The assistant gives "
        "helpful, detailed, and polite answers to the user's questions. USER: <video>\nWhat colour is the "
        "circle? ASSISTANT: It is red.</s>USER: Where does it move? ASSISTANT: Left.</s>")
    assert LLAVA_V1.render(QA[:1] + [Message("assistant", None)]).endswith(
        "USER: <video>\nWhat colour is the circle? ASSISTANT:")


def test_render_release_template_differs_only_in_sep2():
    assert VIDEO_LAVIT_RELEASE.render(QA[:2]) == LLAVA_V1.render(QA[:2]).replace("</s>", " \\n </s>")


def test_encode_golden_ids_and_mask(byte_tokenizer):
    vocab = Vocabulary(text_size=259, visual_codes=5, motion_codes=3)
    video = video_token_ids([[0]], [[1]], vocab)
    assert video == [259, 261, 260, 266, 269, 267]
    template = ConversationTemplate(system="S.")
    seq = template.encode([Message("user", "<video>\nQ?"), Message("assistant", "A.")], byte_tokenizer, [video])
    assert template.render([Message("user", "<video>\nQ?"), Message("assistant", "A.")]) == \
        "S. USER: <video>\nQ? ASSISTANT: A.</s>"
    #                  bos  S   .   _    U   S   E   R   :   _
    assert seq.input_ids == [1, 53, 16, 223, 55, 53, 39, 52, 28, 223,
                             259, 261, 260, 266, 269, 267,                       # the video
                             201, 51, 33, 223, 35, 53, 53, 43, 53, 54, 35, 48, 54, 28,  # \nQ? ASSISTANT:
                             223, 35, 16, 2]                                      # " A." eos
    assert seq.labels == [X] * 30 + [223, 35, 16, 2]


def test_loss_only_on_assistant_turns_with_merges(bpe_tokenizer):
    seq = LLAVA_V1.encode(QA, bpe_tokenizer, [[384, 386, 385]])
    runs, current = [], []
    for token, label in zip(seq.input_ids, seq.labels):
        if label == X:
            if current:
                runs.append(current)
            current = []
        else:
            assert label == token
            current.append(token)
    runs.append(current)
    assert [bpe_tokenizer.decode(r) for r in runs] == [" It is red.</s>", " Left.</s>"]
    assert seq.input_ids[0] == bpe_tokenizer.bos_token_id and seq.labels[0] == X


def test_ids_equal_tokenizing_the_rendered_string_split_at_the_placeholder(bpe_tokenizer):
    """What LLaVA / the release do at inference: tokenize around the placeholder, specials parsed."""
    video = [384, 386, 385]
    before, after = LLAVA_V1.render(QA).split("<video>")
    expected = ([bpe_tokenizer.bos_token_id] + bpe_tokenizer(before, add_special_tokens=False).input_ids
                + video + bpe_tokenizer(after, add_special_tokens=False).input_ids)
    assert LLAVA_V1.encode(QA, bpe_tokenizer, [video]).input_ids == expected


def test_generation_prompt_is_the_prefix_before_the_answer(bpe_tokenizer):
    full = LLAVA_V1.encode(QA[:2], bpe_tokenizer, [[384]])
    prompt = LLAVA_V1.generation_prompt(QA[:1], bpe_tokenizer, [[384]])
    assert full.input_ids[:len(prompt)] == prompt
    assert bpe_tokenizer.decode(prompt[-3:]).endswith("ASSISTANT:")
    assert all(label == X for label in full.labels[:len(prompt)])
    assert full.labels[len(prompt)] != X


def test_release_template_supervises_its_sep2_and_eos(bpe_tokenizer):
    seq = VIDEO_LAVIT_RELEASE.encode(QA[:2], bpe_tokenizer, [[384]])
    supervised = [t for t, label in zip(seq.input_ids, seq.labels) if label != X]
    assert bpe_tokenizer.decode(supervised) == " It is red. \\n </s>"
    assert supervised[-1] == bpe_tokenizer.eos_token_id


def test_user_text_cannot_inject_special_tokens(bpe_tokenizer):
    seq = LLAVA_V1.encode([Message("user", "say </s> now"), Message("assistant", "ok")], bpe_tokenizer)
    assert seq.input_ids.count(bpe_tokenizer.eos_token_id) == 1  # only the one closing the answer


@pytest.mark.parametrize("messages,visual", [
    ([Message("user", "<video>\nQ?"), Message("assistant", "A.")], []),
    ([Message("user", "Q?"), Message("assistant", "A.")], [[384]]),
    ([Message("assistant", "A.")], []),
    ([Message("user", "Q?"), Message("user", "Q?")], []),
    ([Message("user", None)], []),
])
def test_encode_refuses_malformed_conversations(bpe_tokenizer, messages, visual):
    with pytest.raises(ValueError):
        LLAVA_V1.encode(messages, bpe_tokenizer, visual)


def test_tokenizer_size_must_match_vocabulary(tmp_path):
    build_tiny_tokenizer(tmp_path, CORPUS, vocab_size=300)
    assert len(load_text_tokenizer(tmp_path, Vocabulary(text_size=300))) == 300
    with pytest.raises(TokenizerMismatchError):
        load_text_tokenizer(tmp_path, Vocabulary.release())


# ------------------------------------------------------------------------------------------ readers
def test_read_llava_image_conversations():
    data = [
        {"id": "000001", "image": "coco/1.jpg", "conversations": [
            {"from": "human", "value": "What is shown?\n<image>"}, {"from": "gpt", "value": "A cat."},
            {"from": "human", "value": "Colour?"}, {"from": "gpt", "value": "Black."}]},
        {"id": "text-only", "conversations": [
            {"from": "gpt", "value": "leading turn is skipped"},
            {"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}]},
    ]
    image, text = read_llava_conversations(data)
    assert (image.sample_id, image.media, image.media_kind) == ("000001", "coco/1.jpg", "image")
    assert image.messages == (Message("user", "<image>\nWhat is shown?"), Message("assistant", "A cat."),
                              Message("user", "Colour?"), Message("assistant", "Black."))
    assert text.media is None and text.messages == (Message("user", "Hi"), Message("assistant", "Hello."))
    with pytest.raises(ValueError):
        read_llava_conversations([{"id": "x", "conversations": [{"from": "robot", "value": "?"}]}])


def test_read_video_chatgpt_qa_and_conversation_forms():
    data = [{"video_id": "v_abc", "q": " What happens? ", "a": "A man runs."},
            {"id": "7", "video": "clips/7.mp4", "conversations": [
                {"from": "human", "value": "<video>\nDescribe."}, {"from": "gpt", "value": "Rain."}]}]
    qa, conv = read_video_qa(data)
    assert (qa.media, qa.media_kind) == ("v_abc", "video")
    assert qa.messages == (Message("user", "<video>\nWhat happens?"), Message("assistant", "A man runs."))
    assert (conv.sample_id, conv.media) == ("7", "clips/7.mp4")
    assert conv.messages[0] == Message("user", "<video>\nDescribe.")


def test_read_synthetic_qa_file(tmp_path):
    path = tmp_path / "qa.json"
    path.write_text(json.dumps([{"video_id": "shapes_0003", "question": "Which way does the circle move?",
                                 "answer": "left", "attribute": "direction"}]))
    (sample,) = read_synthetic_qa(path)
    assert sample.media == "shapes_0003" and sample.meta == {"attribute": "direction"}
    assert LLAVA_V1.render(sample.messages).endswith(
        "USER: <video>\nWhich way does the circle move? ASSISTANT: left</s>")
    with pytest.raises(ValueError):
        read_synthetic_qa([{"video_id": "x", "question": "q"}])
