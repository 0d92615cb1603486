"""Tiny models built locally, deterministically from a seed (no model hub is reachable).

`tiny-llava`: a Llava-style VLM (CLIP vision tower, 2-layer MLP projector, Llama text model with
head_dim 32, the smallest vLLM's CPU attention accepts), briefly trained to caption synthetic images
of coloured shapes, so its captions are words rather than noise. `tiny-llama`: the text model alone.
Both share one byte-level BPE tokenizer trained here, and are saved in the layout vLLM loads.
"""

from __future__ import annotations

import fcntl
import json
import pathlib
import random
import shutil
import tempfile
from collections.abc import Callable

import numpy as np

COLORS = {
    "red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 70, 220),
    "yellow": (235, 210, 40), "white": (245, 245, 245), "black": (15, 15, 15),
}
SHAPES = ("square", "circle", "stripe")
IMAGE_SIZE, PATCH_SIZE = 32, 8
PROMPT = "Describe the image."
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]


def llava_prompt(prompt: str, images: int) -> str:
    """The plain Llava-1.5 conversation format the tiny VLM is trained on."""
    return f"USER: {'<image>' * images}\n{prompt} ASSISTANT:"


#: `llava_prompt` as a chat template, so executors format tiny and real models the same way
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: "
    "{% if message['content'] is string %}{{ '\\n' }}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>{% endif %}{% endfor %}"
    "{{ '\\n' }}{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}"
    "{% endif %} "
    "{% else %}ASSISTANT: {{ message['content'] }}</s>{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def draw(color: str, shape: str, background: str, rng: random.Random) -> np.ndarray:
    """A 32x32 RGB image: one shape of `color` on `background`, at a random place and size."""
    image = np.empty((IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    image[:] = COLORS[background]
    size = rng.randint(10, 18)
    x, y = rng.randint(0, IMAGE_SIZE - size), rng.randint(0, IMAGE_SIZE - size)
    if shape == "square":
        image[y:y + size, x:x + size] = COLORS[color]
    elif shape == "circle":
        yy, xx = np.mgrid[:IMAGE_SIZE, :IMAGE_SIZE]
        r = size / 2
        image[(yy - y - r) ** 2 + (xx - x - r) ** 2 <= r * r] = COLORS[color]
    else:
        image[y:y + size // 3 + 2, :] = COLORS[color]
    return image


def caption(color: str, shape: str, background: str) -> str:
    return f"a {color} {shape} on a {background} background"


def examples(rng: random.Random, count: int) -> list[tuple[np.ndarray, str]]:
    out = []
    for _ in range(count):
        color, background = rng.sample(sorted(COLORS), 2)
        shape = rng.choice(SHAPES)
        out.append((draw(color, shape, background, rng), caption(color, shape, background)))
    return out


def train_tokenizer(rng: random.Random):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    words = [*COLORS, *SHAPES, "a", "an", "the", "on", "of", "in", "with", "background", "image", "picture",
             "describe", "Describe", "what", "is", "this", "it", "USER", "ASSISTANT", "photo", "and"]
    corpus = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) for _ in range(3000)]
    corpus += [llava_prompt(PROMPT, 1) + " " + caption(*rng.sample(sorted(COLORS), 1), rng.choice(SHAPES), "white")
               for _ in range(200)]
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512, special_tokens=SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(corpus, trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tokenizer.token_to_id("<s>"))]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
    )
    fast.chat_template = CHAT_TEMPLATE
    content = [{"type": "image"}, {"type": "text", "text": PROMPT}]
    rendered = fast.apply_chat_template([{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True)
    assert rendered == llava_prompt(PROMPT, 1), rendered
    return fast


def _text_config(tokenizer):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, head_dim=32, max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
    )


def build_tiny_llava(target: pathlib.Path, seed: int, steps: int = 400) -> None:
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import CLIPImageProcessor, CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    rng = random.Random(seed)
    torch.manual_seed(seed)
    tokenizer = train_tokenizer(rng)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
            image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, projection_dim=64,
        ),
        text_config=_text_config(tokenizer),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        image_seq_length=(IMAGE_SIZE // PATCH_SIZE) ** 2,
        vision_feature_select_strategy="default", vision_feature_layer=-2, projector_hidden_act="gelu",
    )
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(
            size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
        ),
        tokenizer=tokenizer, patch_size=PATCH_SIZE, vision_feature_select_strategy="default",
        num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE,
    )
    model = LlavaForConditionalGeneration(config)
    _train_captioning(model, processor, rng, steps)
    model.eval().save_pretrained(target)
    processor.save_pretrained(target)
    # vLLM's Llava loader expects the CLIP weights under `vision_tower.vision_model.`; transformers
    # reads both spellings, so store the one both accept.
    weights = target / "model.safetensors"
    state = {
        ("vision_tower.vision_model." + k.removeprefix("vision_tower.") if k.startswith("vision_tower.") else k): v
        for k, v in load_file(weights).items()
    }
    save_file(state, weights, metadata={"format": "pt"})


def _train_captioning(model, processor, rng: random.Random, steps: int, batch: int = 16) -> None:
    """Teach the model to answer PROMPT with the caption of the image (loss on the answer only)."""
    import torch
    from PIL import Image

    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    prompt = llava_prompt(PROMPT, 1)
    model.train()
    for _ in range(steps):
        pairs = examples(rng, batch)
        texts = [f"{prompt} {text}</s>" for _, text in pairs]
        inputs = processor(images=[Image.fromarray(img) for img, _ in pairs], text=texts, return_tensors="pt", padding=True)
        labels = inputs["input_ids"].clone()
        prompt_length = len(processor(images=Image.fromarray(pairs[0][0]), text=prompt)["input_ids"][0])
        labels[:, :prompt_length] = -100
        labels[inputs["attention_mask"] == 0] = -100
        loss = model(**inputs, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def build_tiny_llama(target: pathlib.Path, seed: int) -> None:
    import torch
    from transformers import LlamaForCausalLM

    rng = random.Random(seed)
    torch.manual_seed(seed)
    tokenizer = train_tokenizer(rng)
    LlamaForCausalLM(_text_config(tokenizer)).eval().save_pretrained(target)
    tokenizer.save_pretrained(target)


TINY_MODELS: dict[str, Callable[[pathlib.Path, int], None]] = {
    "tiny-llava": build_tiny_llava,
    "tiny-llama": build_tiny_llama,
}


def build_tiny(name: str, root: pathlib.Path, seed: int = 0, force: bool = False) -> pathlib.Path:
    """Build tiny model `name` into `root/name` (atomically: a half-built folder is never visible)."""
    target = root / name
    if (target / "config.json").exists() and not force:
        return target
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{name}.lock", "w") as lock:  # executors starting together build it once
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / "config.json").exists() and not force:
            return target
        return _build_locked(name, root, target, seed)


def _build_locked(name: str, root: pathlib.Path, target: pathlib.Path, seed: int) -> pathlib.Path:
    import torch

    staging = pathlib.Path(tempfile.mkdtemp(prefix=f".{name}-", dir=root))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread: the same bits on every build, whatever the machine's load
    try:
        TINY_MODELS[name](staging, seed)
        (staging / "cornserve-build.json").write_text(json.dumps({"name": name, "seed": seed}))
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        torch.set_num_threads(threads)
        shutil.rmtree(staging, ignore_errors=True)
    return target
