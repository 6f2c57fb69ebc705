"""What a checkpoint tells about the adapters a run resumes, read before transformers loads it.

peft saves the ``default`` adapter's ``adapter_config.json`` at the checkpoint's root and any other
adapter's in a sub-folder named after it. When loading fails anyway (a file we could not read), the
"size mismatch" error of ``load_state_dict`` still names the shapes; :func:`ranks_from_error` reads
the checkpoint's rank back from it.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from lora_doctor.facts import AdapterFacts

__all__ = ["checkpoint_adapters", "ranks_from_error", "resolve_checkpoint"]

_CONFIG = "adapter_config.json"

#: torch's load_state_dict message for one tensor (one line per mismatching tensor).
_MISMATCH = re.compile(
    r"size mismatch for (?P<name>\S*lora_(?:embedding_)?(?P<which>[AB])\.(?P<adapter>[^.:\s]+)"
    r"[^:]*): copying a param with shape torch\.Size\(\[(?P<saved>[\d, ]*)\]\) from checkpoint, "
    r"the shape in current model is torch\.Size\(\[(?P<live>[\d, ]*)\]\)"
)


def resolve_checkpoint(output_dir: str | os.PathLike[str] | None, resume: Any) -> str | None:
    """The checkpoint folder ``trainer.train(resume_from_checkpoint=resume)`` will load, or None.

    ``True`` means the last ``checkpoint-N`` folder of ``output_dir`` (as transformers resolves it).

    Example:
        >>> resolve_checkpoint("out", None) is None
        True
    """
    if resume is None or resume is False:
        return None
    if resume is True:
        from transformers.trainer_utils import get_last_checkpoint

        if output_dir is None or not os.path.isdir(output_dir):
            return None
        return get_last_checkpoint(str(output_dir))
    return str(resume) if isinstance(resume, (str, os.PathLike)) else None


def checkpoint_adapters(path: str | os.PathLike[str]) -> dict[str, AdapterFacts]:
    """The adapters saved in a checkpoint folder, by name (empty when none could be read).

    Example:
        >>> checkpoint_adapters("/no/such/folder")
        {}
    """
    root = Path(path)
    found: dict[str, AdapterFacts] = {}
    candidates = [("default", root / _CONFIG)]
    if root.is_dir():
        candidates += [(sub.name, sub / _CONFIG) for sub in sorted(root.iterdir()) if sub.is_dir()]
    for name, file in candidates:
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and "r" in data:
            found[name] = AdapterFacts.from_config(name, data)
    return found


def ranks_from_error(error: BaseException) -> dict[str, AdapterFacts]:
    """The checkpoint's LoRA ranks, by adapter, read from a "size mismatch for ...lora_A..." error.

    A is (r, d_in) and B is (d_out, r): the checkpoint's rank is A's first or B's last dimension.

    Example:
        >>> err = RuntimeError("size mismatch for base_model.model.q_proj.lora_A.default.weight: "
        ...     "copying a param with shape torch.Size([4, 64]) from checkpoint, the shape in "
        ...     "current model is torch.Size([8, 64]).")
        >>> ranks_from_error(err)["default"].r
        4
    """
    found: dict[str, AdapterFacts] = {}
    for m in _MISMATCH.finditer(str(error)):
        dims = [int(d) for d in m["saved"].replace(" ", "").split(",") if d]
        if len(dims) < 2 or m["adapter"] in found:
            continue
        r = dims[0] if m["which"] == "A" else dims[-1]
        found[m["adapter"]] = AdapterFacts(name=m["adapter"], r=r)
    return found
