"""A team's chat template decides how a prompt reaches its model, in training and in serving alike.

Vision-language processors' templates (llava-hf's, Qwen-VL's) take a user turn as content parts
and place the image marker themselves; text-only templates (and the tiny models') take a string.
The Preprocessor finds out which once, by rendering, and feeds the model what its own processor's
`apply_chat_template` would. A template that renders no prompt at all is refused when the directory
is opened, and a template kept where older transformers put it (chat_template.json) is found."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from fuseloop.families.hf_directory import open_model_directory
from fuseloop.families.hf_loading import ModelDirectoryError
from fuseloop.families.tiny import IMAGE_TOKEN, TinyConfig, build_llava, task_tokenizer
from fuseloop.preprocessing import PARTS, TEXT, PreprocessConfig, Preprocessor, chat_prompt

# The shape of llava-hf's template: every image part first, then the text parts; a string turn
# renders as nothing at all.
LLAVA_HF = ("{% for message in messages %}{{ message['role'].upper() + ': ' }}"
            "{% for part in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
            "{% for part in message['content'] | selectattr('type', 'equalto', 'text') %}{{ part['text'] + ' ' }}{% endfor %}"
            "{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")
# The shape of Qwen-VL's: a string turn as it is, parts with the template's own image marker.
BOTH = ("{% for message in messages %}<|user|>"
        "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
        "{% for part in message['content'] %}{% if part['type'] == 'image' %}[img]<image>[/img]"
        "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")
PROMPT = "what color is the ball"


def preprocessor(template: str, image_tokens: int = 3) -> Preprocessor:
    tokenizer = task_tokenizer((IMAGE_TOKEN,))
    tokenizer.chat_template = template
    return Preprocessor(tokenizer, PreprocessConfig(image_token=IMAGE_TOKEN, image_tokens=image_tokens))


def expanded(pre: Preprocessor, text: str) -> list[int]:
    ids = pre.tokenizer.encode(text, add_special_tokens=False)
    at = ids.index(pre.image_token_id)
    return ids[:at] + [pre.image_token_id] * pre.config.image_tokens + ids[at + 1:]


def test_a_llava_hf_template_gets_content_parts_and_places_the_image_itself():
    pre = preprocessor(LLAVA_HF)
    assert pre.chat_form == PARTS
    assert chat_prompt(pre.tokenizer, PROMPT, IMAGE_TOKEN, pre.chat_form) == f"USER: <image>\n{PROMPT} ASSISTANT:"
    assert pre.prompt_ids(PROMPT) == expanded(pre, f"USER: <image>\n{PROMPT} ASSISTANT:")


def test_a_template_that_takes_both_forms_places_its_own_image_marker():
    pre = preprocessor(BOTH)
    assert pre.chat_form == PARTS
    assert chat_prompt(pre.tokenizer, PROMPT, IMAGE_TOKEN) == f"<|user|>[img]<image>[/img]{PROMPT}<|assistant|>"


def test_a_text_only_template_gets_a_string_with_the_image_token_before_the_text():
    from fuseloop.families.tiny import CHAT_TEMPLATE

    pre = preprocessor(CHAT_TEMPLATE)
    assert pre.chat_form == TEXT
    assert chat_prompt(pre.tokenizer, PROMPT, IMAGE_TOKEN) == f"[BOS]{IMAGE_TOKEN} {PROMPT} [SEP]"


def test_a_parts_template_that_drops_the_image_gets_the_token_from_the_text_form():
    # Parts render the text only; the string form renders as it is, so the token goes there.
    text_only_parts = ("{% for m in messages %}{% if m['content'] is string %}{{ m['content'] }}{% else %}"
                       "{% for p in m['content'] %}{% if p['type'] == 'text' %}{{ p['text'] }}{% endif %}{% endfor %}"
                       "{% endif %}{% endfor %}")
    pre = preprocessor(text_only_parts)
    assert pre.chat_form == TEXT
    assert pre.prompt_ids(PROMPT).count(pre.image_token_id) == 3


def test_the_length_limit_counts_the_text_not_the_template_s_image_placeholders():
    pre = preprocessor(LLAVA_HF, image_tokens=40)
    assert len(pre.prompt_ids(PROMPT)) > pre.config.max_prompt_tokens  # 40 placeholders pass


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory) -> Path:
    return build_llava(tmp_path_factory.mktemp("chat") / "model", TinyConfig())


def with_template(src: Path, dst: Path, template: str | None, legacy: bool = False) -> Path:
    """A copy of the model directory whose chat template is `template`: in chat_template.jinja (as
    transformers 5 saves it) or, `legacy`, only in chat_template.json (as older ones did)."""
    shutil.copytree(src, dst)
    (dst / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((dst / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (dst / "tokenizer_config.json").write_text(json.dumps(config))
    if template is not None:
        if legacy:
            (dst / "chat_template.json").write_text(json.dumps({"chat_template": template}))
        else:
            (dst / "chat_template.jinja").write_text(template)
    return dst


def test_a_model_directory_with_a_llava_hf_template_is_prompted_as_its_own_processor_prompts_it(llava_dir, tmp_path):
    from transformers import AutoProcessor
    from PIL import Image

    directory = with_template(llava_dir, tmp_path / "team", LLAVA_HF)
    opened = open_model_directory(directory)
    processor = AutoProcessor.from_pretrained(str(directory), local_files_only=True)
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}]
    text = processor.apply_chat_template(conversation, add_generation_prompt=True)
    theirs = processor(images=Image.new("RGB", (32, 32)), text=text, return_tensors="np")["input_ids"][0].tolist()
    assert opened.preprocessor.prompt_ids(PROMPT) == theirs


def test_a_template_kept_only_in_chat_template_json_is_found(llava_dir, tmp_path):
    directory = with_template(llava_dir, tmp_path / "old", LLAVA_HF, legacy=True)
    pre = open_model_directory(directory).preprocessor
    assert pre.tokenizer.chat_template == LLAVA_HF
    assert pre.prompt_ids(PROMPT) == expanded(pre, f"USER: <image>\n{PROMPT} ASSISTANT:")


def test_a_template_that_renders_no_prompt_is_refused_when_the_directory_is_opened(llava_dir, tmp_path):
    directory = with_template(llava_dir, tmp_path / "broken", "{% for m in messages %}USER: hello{% endfor %}")
    with pytest.raises(ModelDirectoryError, match="chat template renders neither"):
        open_model_directory(directory)
