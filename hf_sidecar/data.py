"""Question-answer data for the three adaptation phases, and its tokenization.

The bundled data is a subset of TOFU (Maini et al., 2024, "TOFU: A Task of Fictitious Unlearning
for LLMs", MIT licence, see ``resources/tofu/LICENSE``). Users can point ``data_dir`` at a folder
with files of the same shape:

- ``fictitious_authors.jsonl``: rows ``{"author", "question", "answer"}``, the private memory;
- ``world_facts.jsonl`` and ``real_authors.jsonl``: rows ``{"question", "answer"}``, public skill;
- ``refusals.txt``: one refusal sentence per line, the safety phase's targets.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

BUNDLED_DATA_DIR = Path(__file__).parent / "resources" / "tofu"
DATA_FILES = {
    "fictitious_authors": ("author", "question", "answer"),
    "world_facts": ("question", "answer"),
    "real_authors": ("question", "answer"),
}
IGNORE_INDEX = -100


class DataError(ValueError):
    """Raised when a data file is missing, malformed, or too small for the requested split."""


@dataclass(frozen=True)
class Example:
    """One prompt and its training target.

    ``answer`` is the target the phase trains on (a refusal sentence for safety prompts), while
    ``reference`` is always the ground-truth answer, used by the metrics.
    """

    id: str
    question: str
    answer: str
    kind: str
    author: str | None = None
    reference: str | None = None

    @property
    def ground_truth(self) -> str:
        return self.reference if self.reference is not None else self.answer


@dataclass
class TofuData:
    """The raw rows of a data folder."""

    fictitious: list[Example]
    public: list[Example]
    refusals: list[str]
    source: str

    @property
    def authors(self) -> list[str]:
        return sorted({example.author for example in self.fictitious if example.author})


_FOLDER_HINT = f"A data folder needs {', '.join(f + '.jsonl' for f in DATA_FILES)} and refusals.txt."


def _read_jsonl(path: Path, keys: Sequence[str], missing_hint: str) -> list[dict]:
    if not path.is_file():
        raise DataError(f"Data file {path} not found. {missing_hint}")
    rows = []
    with open(path, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(
                    f"{path}:{line_number}: invalid JSON ({err.msg} at column {err.colno}). "
                    f"Each line must be one JSON object with the keys {list(keys)}."
                ) from err
            if not isinstance(row, dict):
                raise DataError(f"{path}:{line_number}: expected a JSON object with the keys {list(keys)}, got {type(row).__name__}.")
            for key in keys:
                value = row.get(key)
                if not isinstance(value, str) or not value.strip():
                    raise DataError(
                        f"{path}:{line_number}: key {key!r} is missing or not a non-empty string. "
                        f"Each line must be a JSON object with the string keys {list(keys)}."
                    )
            rows.append(row)
    return rows


def load_data(data_dir: str | Path | None = None) -> TofuData:
    """Read a data folder (by default the bundled TOFU subset) and validate every row."""
    root = Path(data_dir) if data_dir is not None else BUNDLED_DATA_DIR
    fictitious = [
        Example(id=f"fictitious-{index:04d}", question=row["question"], answer=row["answer"], kind="memory", author=row["author"])
        for index, row in enumerate(_read_jsonl(root / "fictitious_authors.jsonl", DATA_FILES["fictitious_authors"], _FOLDER_HINT))
    ]
    public = []
    for name in ("world_facts", "real_authors"):
        for index, row in enumerate(_read_jsonl(root / f"{name}.jsonl", DATA_FILES[name], _FOLDER_HINT)):
            public.append(Example(id=f"{name.replace('_', '-')}-{index:04d}", question=row["question"], answer=row["answer"], kind="public"))
    refusals_path = root / "refusals.txt"
    if not refusals_path.is_file():
        raise DataError(f"Data file {refusals_path} not found: it must hold one refusal sentence per line.")
    refusals = [line.strip() for line in refusals_path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not refusals:
        raise DataError(f"{refusals_path} contains no refusal sentence; write one per line.")
    return TofuData(fictitious=fictitious, public=public, refusals=refusals, source=str(root))


@dataclass(frozen=True)
class SplitSizes:
    """How many examples each split takes."""

    memorized_authors: int = 6
    safety_per_author: int = 10
    validation_per_author: int = 5
    test_per_author: int = 5
    public_retain: int = 40
    public_eval: int = 40
    scoring_refusals: int = 5
    refusal_pool: int | None = None


@dataclass
class Splits:
    """The datasets of one trial: three training phases and the evaluation prompt sets."""

    seed: int
    memorized_authors: list[str]
    phase_a: list[Example]
    phase_m: list[Example]
    phase_s: list[Example]
    validation: list[Example]
    test: list[Example]
    public_eval: list[Example]
    scoring_refusals: list[str]
    memories: dict[str, list[Example]] = field(default_factory=dict)

    def summary(self) -> dict[str, int]:
        return {
            "phase_a": len(self.phase_a),
            "phase_m": len(self.phase_m),
            "phase_s": len(self.phase_s),
            "validation": len(self.validation),
            "test": len(self.test),
            "public_eval": len(self.public_eval),
        }


def make_splits(data: TofuData, sizes: SplitSizes, seed: int) -> Splits:
    """Draw the memorized authors and split every question set disjointly, seeded by ``seed``.

    Each memorized author's questions go to safety training (with a refusal target), validation
    and held-out test prompts; the memory phase trains on all of them. Public questions go to
    skill training, safety retain examples (normal answers) and evaluation.
    """
    rng = random.Random(seed)
    authors = data.authors
    if sizes.memorized_authors > len(authors):
        raise DataError(f"memorized_authors={sizes.memorized_authors} but the data has only {len(authors)} authors.")
    memorized = sorted(rng.sample(authors, sizes.memorized_authors))
    per_author = sizes.safety_per_author + sizes.validation_per_author + sizes.test_per_author
    refusal_rng = random.Random(f"{seed}:refusals")
    # A small model trained from scratch blends many different refusal targets into garbled
    # text, so small presets draw targets from the first ``refusal_pool`` sentences only.
    refusal_targets = data.refusals[: sizes.refusal_pool] if sizes.refusal_pool else data.refusals

    phase_m: list[Example] = []
    phase_s: list[Example] = []
    validation: list[Example] = []
    test: list[Example] = []
    memories: dict[str, list[Example]] = {}
    for author in memorized:
        questions = [example for example in data.fictitious if example.author == author]
        if len(questions) < per_author:
            raise DataError(
                f"Author {author!r} has {len(questions)} questions but the split needs {per_author} "
                f"(safety {sizes.safety_per_author} + validation {sizes.validation_per_author} + test {sizes.test_per_author})."
            )
        memories[author] = list(questions)
        phase_m.extend(questions)
        shuffled = list(questions)
        rng.shuffle(shuffled)
        for example in shuffled[: sizes.safety_per_author]:
            phase_s.append(
                Example(
                    id=f"{example.id}-refusal",
                    question=example.question,
                    answer=refusal_rng.choice(refusal_targets),
                    kind="refusal",
                    author=author,
                    reference=example.answer,
                )
            )
        validation.extend(shuffled[sizes.safety_per_author : sizes.safety_per_author + sizes.validation_per_author])
        test.extend(shuffled[sizes.safety_per_author + sizes.validation_per_author : per_author])

    public = list(data.public)
    rng.shuffle(public)
    held = sizes.public_retain + sizes.public_eval
    if held >= len(public):
        raise DataError(f"public_retain + public_eval = {held} leaves no public skill examples out of {len(public)}.")
    retain = public[: sizes.public_retain]
    public_eval = public[sizes.public_retain : held]
    phase_a = public[held:]
    phase_s.extend(Example(id=f"{example.id}-retain", question=example.question, answer=example.answer, kind="retain") for example in retain)

    return Splits(
        seed=seed,
        memorized_authors=memorized,
        phase_a=phase_a,
        phase_m=phase_m,
        phase_s=phase_s,
        validation=validation,
        test=test,
        public_eval=public_eval,
        scoring_refusals=data.refusals[: sizes.scoring_refusals],
        memories=memories,
    )


def write_jsonl(path: str | Path, examples: Iterable[Example]) -> None:
    """Write ``examples`` as JSONL, one object per line, atomically."""
    from .io import atomic_write_text

    lines = [json.dumps({k: v for k, v in vars(example).items() if v is not None}, ensure_ascii=False) for example in examples]
    atomic_write_text(path, "\n".join(lines) + "\n")


def read_examples(path: str | Path) -> list[Example]:
    """Read examples written by :func:`write_jsonl` (``id``, ``question`` and ``answer`` required)."""
    rows = _read_jsonl(
        Path(path),
        ("id", "question", "answer"),
        "Pass a JSONL file with the keys id, question and answer on each line; `hf-sidecar demo` writes "
        "validation.jsonl, test.jsonl and public_eval.jsonl into each trial folder.",
    )
    return [
        Example(
            id=row["id"],
            question=row["question"],
            answer=row["answer"],
            kind=row.get("kind", "custom"),
            author=row.get("author"),
            reference=row.get("reference"),
        )
        for row in rows
    ]


@dataclass(frozen=True)
class TokenizedExample:
    """Token ids of one example; ``labels`` is ``IGNORE_INDEX`` on the prompt, so only answer tokens train."""

    id: str
    input_ids: tuple[int, ...]
    labels: tuple[int, ...]

    @property
    def answer_tokens(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE_INDEX)


def prompt_text(tokenizer, question: str) -> str:
    """Render ``question`` as a user turn followed by the assistant's generation prompt."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False
        )
    return f"Question: {question}\nAnswer: "


def encode_prompt(tokenizer, question: str) -> list[int]:
    return tokenizer(prompt_text(tokenizer, question), add_special_tokens=False)["input_ids"]


def encode_continuation(tokenizer, text: str) -> list[int]:
    """Token ids of an answer as the model is trained to produce it: the text, then end-of-sequence."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        ids = ids + [tokenizer.eos_token_id]
    return ids


def tokenize_examples(tokenizer, examples: Iterable[Example], max_length: int) -> dict[str, TokenizedExample]:
    """Tokenize ``examples`` with the chat template, keyed by example id.

    Sequences longer than ``max_length`` are cut from the end of the answer, so every example
    keeps its whole prompt and at least one answer token.
    """
    tokenized: dict[str, TokenizedExample] = {}
    for example in examples:
        if example.id in tokenized:
            raise DataError(f"Duplicate example id {example.id!r}: ids must be unique within a phase.")
        prompt = encode_prompt(tokenizer, example.question)
        answer = encode_continuation(tokenizer, example.answer)
        if len(prompt) + 1 > max_length:
            raise DataError(
                f"Example {example.id!r}: its prompt is {len(prompt)} tokens, which leaves no answer token "
                f"within max_length={max_length}. Raise max_length or shorten the question."
            )
        answer = answer[: max_length - len(prompt)]
        tokenized[example.id] = TokenizedExample(
            id=example.id,
            input_ids=tuple(prompt + answer),
            labels=tuple([IGNORE_INDEX] * len(prompt) + answer),
        )
    return tokenized


def fingerprint_examples(batch: Sequence[TokenizedExample]) -> str:
    """Hash the ids, token ids and labels of ``batch`` in order, so a replay can check its inputs."""
    digest = hashlib.sha256()
    for example in batch:
        digest.update(example.id.encode("utf-8") + b"\0")
        digest.update(torch.tensor(example.input_ids, dtype=torch.int64).numpy().tobytes())
        digest.update(b"\1")
        digest.update(torch.tensor(example.labels, dtype=torch.int64).numpy().tobytes())
        digest.update(b"\2")
    return digest.hexdigest()


def collate(batch: Sequence[TokenizedExample], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad ``batch`` into ``input_ids``, ``attention_mask`` and ``labels`` tensors."""
    length = max(len(example.input_ids) for example in batch)
    input_ids = torch.full((len(batch), length), pad_token_id, dtype=torch.long)
    labels = torch.full((len(batch), length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), length), dtype=torch.long)
    for row, example in enumerate(batch):
        size = len(example.input_ids)
        input_ids[row, :size] = torch.tensor(example.input_ids)
        labels[row, :size] = torch.tensor(example.labels)
        attention_mask[row, :size] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
