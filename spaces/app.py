"""Entry point of the hf-sidecar Hugging Face Space; the page itself is :mod:`hf_sidecar.space`.

On a Space, the ``HF_SIDECAR_*`` variables (or ``space_config.json`` next to this file) name
what to serve: ``HF_SIDECAR_MODEL_REPO`` and ``HF_SIDECAR_SIDECAR_REPO`` for Hub repositories,
or ``HF_SIDECAR_ARTIFACTS`` for a folder that ``hf-sidecar demo`` wrote. Locally,
``python spaces/app.py`` reads the same variables and listens on 127.0.0.1 unless
``GRADIO_SERVER_NAME`` sets another address (Spaces sets it to 0.0.0.0).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

# huggingface_hub and gradio read these when they are imported, so they are set first.
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
if os.environ.get("HF_SIDECAR_ARTIFACTS"):
    os.environ["HF_HUB_OFFLINE"] = "1"

from hf_sidecar import space  # noqa: E402

CONFIG_FILE = Path(__file__).resolve().with_name("space_config.json")


def build_app(artifacts: Path | None = None, **options):
    """Build the page for a demo output folder, or for what the variables and config file name.

    ``options`` go to :func:`hf_sidecar.space.build_app` (``max_new_tokens``, ``queue_size``,
    ``trial``, ``examples``).
    """
    if artifacts is not None:
        return space.build_app(artifacts, **options)
    options.setdefault("max_new_tokens", space.max_new_tokens_from_environment())
    return space.build_app(source=space.source_from_environment(config_file=CONFIG_FILE), **options)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    space.launch_app(build_app(), host=None)
