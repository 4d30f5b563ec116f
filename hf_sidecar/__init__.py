"""hf-sidecar: process sidecars that revoke a memory fine-tune while keeping safety training.

The public API:

- :class:`ProcessConfig`, :func:`train`, :class:`ProcessRecord`, :func:`run_process`: the
  recorded, replayable AdamW training loop;
- :func:`build_sidecar` and :class:`Sidecar`: the revocation artifact and how to build it;
- :func:`revoke_state_dict`, :func:`revoke_model_`, :func:`revoke_checkpoint`: applying it;
- :class:`SidecarModelForCausalLM`: loading a model with the revocation applied as it streams in;
- :func:`run_demo`: the end-to-end demo on the bundled TOFU data.
"""

__version__ = "0.1.0"

from .build import BuildResult, build_sidecar, memory_update, run_oracle  # noqa: E402
from .data import DataError, Example, SplitSizes, load_data, make_splits, tokenize_examples  # noqa: E402
from .edit import edit_tensor, revoke_checkpoint, revoke_model_, revoke_state_dict  # noqa: E402
from .io import CheckpointError, content_digest  # noqa: E402
from .metrics import RefusalScorer, closure, is_refusal, parameter_error, rouge_l_recall  # noqa: E402
from .process import ProcessConfig, ProcessMismatchError, ProcessRecord, run_process, train  # noqa: E402
from .sidecar import LowRank, Sidecar, SidecarError, SidecarMismatchError  # noqa: E402
from .hub import PublicRepositoryWarning, SidecarHubError  # noqa: E402
from .loading import SidecarModelForCausalLM  # noqa: E402


def run_demo(*args, **kwargs):
    """Run the demo; see :func:`hf_sidecar.demo.run_demo`."""
    from .demo import run_demo as _run_demo

    return _run_demo(*args, **kwargs)


__all__ = [
    "BuildResult",
    "CheckpointError",
    "DataError",
    "Example",
    "LowRank",
    "ProcessConfig",
    "ProcessMismatchError",
    "ProcessRecord",
    "PublicRepositoryWarning",
    "RefusalScorer",
    "Sidecar",
    "SidecarError",
    "SidecarHubError",
    "SidecarMismatchError",
    "SidecarModelForCausalLM",
    "SplitSizes",
    "build_sidecar",
    "closure",
    "content_digest",
    "edit_tensor",
    "is_refusal",
    "load_data",
    "make_splits",
    "memory_update",
    "parameter_error",
    "revoke_checkpoint",
    "revoke_model_",
    "revoke_state_dict",
    "rouge_l_recall",
    "run_demo",
    "run_oracle",
    "run_process",
    "tokenize_examples",
    "train",
]
