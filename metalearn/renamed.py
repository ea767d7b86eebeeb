"""Data keys that the shared split vocabulary replaced, and the migration of configs stored before it.

Every dataset now takes its split as ``data.train``, ``data.val``, ``data.test`` (names or glob
patterns), ``data.split_seed`` and ``data.ratios`` (``metalearn.data.common.SplitConfig``). The keys
they replaced, given by a user (command line, a YAML), end with one line naming the new key
(``renamed_message``); a config stored by an earlier metalearn (a checkpoint's, a run's
``.hydra/config.yaml``) is rewritten to the new keys when it is read (``migrate``), so old runs
resume, evaluate and compare as before.

- ``train_alphabets``/``val_alphabets``/``test_alphabets`` and ``split`` (omniglot): ``train``/``val``/
  ``test`` (alphabet names); ``split: vinyals`` is now the empty lists with the official archives.
- ``train_classes``/``val_classes``/``test_classes`` (mnist, doublemnist: lists of classes):
  ``train``/``val``/``test``.
- ``train_classes``/``val_classes``/``test_classes`` (glyphs: counts): ``split_sizes: [train, val, test]``.
- ``seed`` (glyphs, doublemnist: the seed that generates the dataset): ``generation_seed``.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping

LISTS = {f"{split}_{kind}": split for kind in ("alphabets", "classes") for split in ("train", "val", "test")}
#: glyphs' class counts before ``split_sizes`` (their old defaults fill in the ones not given).
GLYPH_COUNTS = {"train_classes": 300, "val_classes": 100, "test_classes": 100}
#: Datasets whose ``seed`` generated the data: now ``generation_seed``.
GENERATED = ("glyphs", "doublemnist")
OLD_KEYS = (*LISTS, "split", "seed")
_PLAIN = re.compile(r"[\w.*?\[\]/-]+")  # a value Hydra's command line takes unquoted


def _literal(value: Any) -> str:
    """``value`` written as on the command line: lists as ``[a,b]``, odd strings quoted."""
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_literal(v) for v in value) + "]"
    text = str(value)
    return text if isinstance(value, (int, float)) or _PLAIN.fullmatch(text) or text.startswith("[") else repr(text)


def renamed_message(name: str | None, given: Mapping[str, Any], fields: set[str] | None = None,
                    prefix: str = "data") -> str | None:
    """The one line for the replaced keys in ``given`` (key -> value: the command line's text, or a
    YAML value) of dataset ``name``, or None if none of them is one. Keys that are ``fields`` of the
    dataset's Config are not old keys."""
    old = {k: v for k, v in given.items() if k in OLD_KEYS and k not in (fields or set())}
    if "seed" in old and name not in GENERATED:
        old.pop("seed")  # never a data key of other datasets: the generic "unknown option" line says it
    if "split" in old and name not in (None, "omniglot"):
        old.pop("split")
    if not old:
        return None
    uses = []
    counts = [k for k in old if k in GLYPH_COUNTS]
    if name == "glyphs" and counts:
        sizes = [old.get(k, default) for k, default in GLYPH_COUNTS.items()]
        uses.append(f"{prefix}.split_sizes={_literal(sizes)}")
    else:
        uses += [f"{prefix}.{LISTS[k]}={_literal(v)}" for k, v in old.items() if k in LISTS]
    if "seed" in old:
        uses.append(f"{prefix}.generation_seed={_literal(old['seed'])}")
    keys = [f"{prefix}.{k}" for k in old]
    verb = "was renamed" if len(keys) == 1 else "were renamed"
    note = ""
    if "split" in old:
        verb = "was removed" if len(keys) == 1 else "were replaced"
        note = (f"leave {prefix}.train, {prefix}.val and {prefix}.test empty for the Vinyals split (official archives), "
                "or name alphabets or characters in them")
        if not uses:
            return f"{', '.join(keys)} {verb}: {note}"
        note = f"; {prefix}.split is gone: {note}"
    return f"{', '.join(keys)} {verb}: use {' '.join(uses)}{note}"


def check_renamed(schema: type, node: Any, where: str) -> None:
    """Raise the one-line ConfigError for replaced keys in ``node``, the options of a dataset's Config."""
    from metalearn.errors import ConfigError

    if not isinstance(node, Mapping) or not getattr(schema, "__module__", "").startswith("metalearn.data."):
        return
    fields = {f.name for f in dataclasses.fields(schema)}
    message = renamed_message(node.get("name"), node, fields, prefix=where or "data")
    if message:
        raise ConfigError(message)


def migrate(config: dict) -> list[str]:
    """Rewrite the ``data`` node of a stored run config (a plain dict) to the current keys, in place;
    the list of what changed (empty for a current config)."""
    data = config.get("data") if isinstance(config, dict) else None
    if not isinstance(data, dict):
        return []
    name, changed = data.get("name"), []
    if name == "glyphs" and any(k in data for k in GLYPH_COUNTS) and "split_sizes" not in data:
        data["split_sizes"] = [int(data.pop(k, default)) for k, default in GLYPH_COUNTS.items()]
        changed.append("train/val/test_classes -> split_sizes")
    if name in GENERATED and "seed" in data and "generation_seed" not in data:
        data["generation_seed"] = data.pop("seed")
        changed.append("seed -> generation_seed")
    if name == "omniglot" and ("split" in data or any(f"{s}_alphabets" in data for s in ("train", "val", "test"))):
        split = data.pop("split", "vinyals")
        lists = {s: list(data.pop(f"{s}_alphabets", None) or []) for s in ("train", "val", "test")}
        for s, names in lists.items():
            data.setdefault(s, names if split == "alphabets" else [])
        changed.append(f"split={split} and *_alphabets -> train/val/test")
    if name in ("mnist", "doublemnist") and any(f"{s}_classes" in data for s in ("train", "val", "test")):
        from metalearn.data import dataset_module

        module = dataset_module(name)
        standard = module.STANDARD_SPLIT if name == "mnist" else module.TORCHMETA_SPLIT
        lists = {s: [str(c).zfill(2) if name == "doublemnist" and str(c).isdigit() else str(c)
                     for c in data.pop(f"{s}_classes", None) or []] for s in ("train", "val", "test")}
        # The standard split given in full (as every stored default was) is the standard split.
        if all(sorted(lists[s]) == sorted(standard[s]) for s in lists):
            lists = {s: [] for s in lists}
        for s, names in lists.items():
            data.setdefault(s, names)
        changed.append("train/val/test_classes -> train/val/test")
    return changed
