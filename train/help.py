"""`dsv4-train --help`: the config groups with their presets and the most used keys, one line each.

Hydra's own help lists every entry of the ConfigStore, the schemas (`model_schema`, ...) among the presets, and no
key's meaning. This page is built from the same sources the job reads: the presets are the YAML files in conf/<group>/,
the defaults are conf/config.yaml's defaults list, and each key's line is the first sentence of its field's docstring
in the schema (conf/groups.py, model/config.py), so it cannot drift from the code. Hydra's page stays behind
`--hydra-help`.
"""

from __future__ import annotations

import ast
import inspect
import os
import re
import textwrap
from functools import lru_cache

import yaml

from dsv4.conf.schema import _GROUPS, CONF_DIR, _presets

KEYS = ("run.steps", "run.output_dir", "run.resume", "run.save_interval", "run.eval_interval", "run.seed",
        "data.prefixes", "data.seq_length", "data.micro_batch_size", "data.global_batch_size", "optim.lr",
        "optim.warmup_steps", "optim.schedule", "parallel.tp", "parallel.pp", "parallel.ep", "model.num_layers",
        "model.hidden_size", "model.quant_sim", "precision.params_dtype")
"""The keys the help lists, in this order (every other key: `--cfg job` prints them, the schemas document them)."""


@lru_cache(maxsize=None)
def field_docs(schema: type) -> dict[str, str]:
    """Field name -> its docstring (the string literal under the field) of a dataclass schema."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(schema)))
    body = tree.body[0].body
    docs = {}
    for node, after in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)):
            docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def _first_sentence(text: str, width: int = 90) -> str:
    """The docstring's first sentence (up to a full stop before a capital: "e.g. x" goes on), on one line."""
    found = re.search(r"\.\s+(?=[A-Z])", text)
    text = text[:found.start() + 1] if found else text
    return text if len(text) <= width else text[:text.rfind(" ", 0, width - 4)] + " ..."


def usage() -> str:
    with open(os.path.join(CONF_DIR, "config.yaml")) as f:
        defaults = {k: v for entry in yaml.safe_load(f)["defaults"] if isinstance(entry, dict)
                    for k, v in entry.items()}
    lines = ["dsv4-train: pre-train a DeepSeek-V4-style model (Hydra: presets per group and KEY=VALUE overrides).",
             "",
             "usage: dsv4-train [GROUP=PRESET ...] [KEY=VALUE ...] [--cfg job] [-m]",
             "       torchrun --nproc-per-node=N -m dsv4.train [GROUP=PRESET ...] [KEY=VALUE ...]",
             "",
             "groups (the default preset in brackets):"]
    for group in _GROUPS:
        presets = [f"[{p}]" if p == defaults.get(group) else p for p in _presets(group)]
        lines.append(f"  {group:<10} {' '.join(presets)}")
    lines += ["", "most used keys:"]
    width = max(map(len, KEYS))
    for key in KEYS:
        group, name = key.split(".")
        doc = _first_sentence(field_docs(_GROUPS[group])[name])
        lines.append(f"  {key:<{width}}  {doc}")
    lines += ["",
              "every key with its value: dsv4-train [overrides] --cfg job; each key's meaning: dsv4/conf/groups.py and",
              "dsv4/model/config.py (one docstring per field). A misspelt key or preset fails naming the valid ones.",
              "Hydra's own options: dsv4-train --hydra-help."]
    return "\n".join(lines)
