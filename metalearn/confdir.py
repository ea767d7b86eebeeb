"""Where the Hydra configs are, and composing them outside a Hydra app.

The configs live in the top-level ``conf/`` of the source tree (the project's layout). A wheel
carries the same folder inside the package, as ``metalearn/conf/`` (pyproject's hatch
``force-include``), so an installed metalearn runs from any directory with no source tree.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator, Sequence

_PACKAGE = Path(__file__).resolve().parent


def _find() -> Path:
    for candidate in (_PACKAGE / "conf", _PACKAGE.parent / "conf"):  # installed wheel, then source tree
        if (candidate / "config.yaml").is_file():
            return candidate
    raise RuntimeError(f"metalearn's configs are missing: neither {_PACKAGE / 'conf'} nor {_PACKAGE.parent / 'conf'} "
                       "holds config.yaml; reinstall metalearn")


CONF_DIR = _find()


@contextlib.contextmanager
def initialized() -> Iterator[None]:
    """Hydra's compose API over metalearn's configs (for ``compose`` calls outside an app)."""
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        yield


def compose(config_name: str = "config", overrides: Sequence[str] = ()):
    """The composed DictConfig of ``config_name`` (config | eval) with ``overrides``, as the CLI would."""
    from hydra import compose as hydra_compose

    with initialized():
        return hydra_compose(config_name, overrides=list(overrides))
