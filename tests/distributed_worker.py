"""Worker that tests/test_distributed.py starts under torchrun: train or replay with several processes.

Usage: ``torchrun --nproc_per_node N tests/distributed_worker.py train|replay OUT_DIR [RECORD]``.
Rank 0 writes the end state (``end.safetensors``) and, for ``train``, the record (``process.json``).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from conftest import SMALL_SPEC, SMALL_SIZES  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from hf_sidecar.data import load_data, make_splits, tokenize_examples  # noqa: E402
from hf_sidecar.models import load_tiny_tokenizer, tiny_llama  # noqa: E402
from hf_sidecar.process import ProcessConfig, ProcessRecord, distributed_context, run_process, train  # noqa: E402

CONFIG = ProcessConfig(learning_rate=2e-3, num_epochs=2, batch_size=6, micro_batch_size=2, warmup_steps=2, seed=3, max_length=64)


def main() -> None:
    mode, out = sys.argv[1], Path(sys.argv[2])
    tokenizer = load_tiny_tokenizer()
    splits = make_splits(load_data(), SMALL_SIZES, seed=0)
    examples = tokenize_examples(tokenizer, splits.phase_s, 64)
    model = tiny_llama(SMALL_SPEC, tokenizer, seed=0, attention_dropout=float(sys.argv[4]) if len(sys.argv) > 4 else 0.0)
    if mode == "train":
        record = train(model, "safety", CONFIG, examples, progress=False)
        end = {name: parameter.detach().clone() for name, parameter in model.named_parameters()}
    else:
        record = ProcessRecord.load(sys.argv[3])
        end = run_process(model, record, examples, progress=False)
    rank, world_size = distributed_context()
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        save_file({name: tensor.contiguous() for name, tensor in end.items()}, str(out / "end.safetensors"))
        record.save(out / "process.json")
        (out / "world_size").write_text(str(world_size))
    # Leave the group explicitly: a process that exits with gloo's threads still running can
    # abort with "terminate called without an active exception".
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
