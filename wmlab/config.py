"""Config composition shared by the CLI and the study: Hydra's config loader over ``wmlab/conf``.

Each verb has a primary config ``wmlab/conf/<verb>.yaml`` (``check-render`` -> ``check_render.yaml``)
with config groups (``env/``, ``encoder/``, ``planner/``, ...) beside it. ``compose("train", [...])`` is
what ``wmlab train ...`` runs with, without Hydra's own ``hydra:`` node, resolved.

This module has no CLI in it (the CLI and ``wmlab.study`` both import it; neither imports the other)
and imports Hydra lazily, so ``import wmlab.config`` stays cheap.
"""

from __future__ import annotations

import difflib
import functools
from collections.abc import Iterable, Sequence
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from wmlab.integrity import UserError

#: Where the verb configs live, in Hydra's search-path syntax
SEARCH_PATH = "pkg://wmlab.conf"
#: The Hydra config semantics wmlab is written against (``hydra.job.chdir`` defaults to False, ...)
VERSION_BASE = "1.3"


class ConfigError(UserError, ValueError):
    """A command-line override the verb cannot honour (an unknown key added with ``+``, a removal)."""


def _run_dir(ckpt_base_path, model_name):
    """``<ckpt_base_path>/outputs/<model_name>`` as in DINO-WM (None without a model name)."""
    if model_name in (None, "", "null"):
        return None
    return str(Path(str(ckpt_base_path)) / "outputs" / str(model_name))


# ``${wmlab.run_dir:${ckpt_base_path},${model_name}}`` in plan.yaml: DINO-WM's run location.
OmegaConf.register_new_resolver("wmlab.run_dir", _run_dir, replace=True)


def config_name(verb: str) -> str:
    """The primary config of ``verb``: ``check-render`` -> ``check_render``."""
    return verb.replace("-", "_")


@functools.cache
def _loader(search_path: str = SEARCH_PATH):
    """Hydra's config loader over ``search_path`` (Hydra's own configs first, as in an app)."""
    from hydra import version
    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra._internal.utils import create_config_search_path

    version.setbase(VERSION_BASE)
    return ConfigLoaderImpl(config_search_path=create_config_search_path(search_path))


def compose_with_hydra(name: str, overrides: Sequence[str] = ()) -> DictConfig:
    """The composed config of ``name`` (a verb or config name) including Hydra's ``hydra:`` node,
    unresolved, exactly as a single run of the app would get it (``hydra.runtime.choices`` says which
    option of each config group was picked)."""
    from hydra.types import RunMode

    check_overrides(name, overrides)
    return _loader().load_configuration(
        config_name=config_name(name), overrides=list(overrides), run_mode=RunMode.RUN, from_shell=False
    )


def compose(name: str, overrides: Sequence[str] = ()) -> DictConfig:
    """The resolved config of verb ``name`` with ``overrides`` (no ``hydra:`` node).

    ``compose("train", ["encoder=pixels", "training.epochs=2"])`` is the config ``wmlab train
    encoder=pixels training.epochs=2`` runs with. Typos fail (Hydra's struct mode); so does adding a
    key the verb does not read (``+model_epoch=3`` where there is no such setting).
    """
    from omegaconf import open_dict

    cfg = compose_with_hydra(name, overrides)
    with open_dict(cfg):
        del cfg["hydra"]
    OmegaConf.resolve(cfg)
    return cfg


def _is_group(key: str) -> bool:
    """Whether ``key`` (``env``, ``worldmodels/wm_env``, ``hydra/launcher``) names a config group."""
    return _loader().repository.group_exists(key.replace(".", "/"))


def check_overrides(name: str, overrides: Iterable[str]) -> None:
    """Refuse overrides Hydra would accept but the verb would ignore or trip on.

    ``+key=value`` adds a key that is not in the verb's config: no code reads it, so it would be
    silently ignored (``wmlab plan +model_epoch=3`` once was). ``~key`` removes a setting the verb
    needs. Config groups (``+preset=cpu``) and Hydra's own settings (``hydra.*``) are left to Hydra.
    Raises ConfigError naming the override and the nearest real settings.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    overrides = list(overrides)
    if not any(o.lstrip().startswith(("+", "~")) for o in overrides):
        return  # the common case: nothing to check, no parsing
    for override in OverridesParser.create().parse_overrides(overrides):
        key = override.key_or_group
        if override.is_hydra_override() or key.startswith("hydra") or _is_group(key):
            continue
        if override.is_add() or override.is_force_add():
            verb_help = f"wmlab {config_name(name).replace('_', '-')} --help"
            if key in _default_keys(name):
                if override.is_force_add():
                    continue  # ++key=value on an existing key is a plain override
                value = override.input_line.split("=", 1)[1] if "=" in override.input_line else "<value>"
                raise ConfigError(
                    f"'{override.input_line}': '{key}' is already a setting of '{config_name(name)}'; "
                    f"give it without '+': {key}={value}"
                )
            if _under_free_form_mapping(name, key):
                continue  # e.g. +encoder_overrides.pixels=[...]: a mapping whose keys are the user's
            hint = suggest_keys(name, [key])
            raise ConfigError(
                f"'{override.input_line}' adds '{key}', which is not a setting of "
                f"'{config_name(name)}': nothing would read it (its settings: {verb_help})"
                + (f"\n{hint}" if hint else "")
            )
        if override.is_delete():
            raise ConfigError(
                f"'{override.input_line}' removes '{key}', which '{config_name(name)}' reads; "
                f"set it instead ({key}=<value>, or {key}=null where the setting allows it)"
            )


#: Mappings whose keys are the user's to choose (study variants), even where a preset already fills them.
FREE_FORM_MAPPINGS = ("encoder_names", "encoder_overrides")


def _under_free_form_mapping(name: str, key: str) -> bool:
    """True when ``key``'s parent is a mapping that is empty by default (``encoder_overrides: {}``) or one
    of ``FREE_FORM_MAPPINGS`` (which a preset may fill: the demo's ``encoder_names`` names its pooled
    ViT): its keys are the user's to choose, and the code reads whatever is there."""
    parent, _, _ = key.rpartition(".")
    if not parent:
        return False
    if parent in FREE_FORM_MAPPINGS:
        return True
    try:
        node = OmegaConf.to_container(compose(name, []), resolve=False)
    except Exception:
        return False
    for part in parent.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return isinstance(node, dict) and not node


def _default_keys(name: str) -> list[str]:
    """The dotted keys of ``name``'s config with its default choices ([] when it does not compose)."""
    try:
        return setting_keys(OmegaConf.to_container(compose(name, []), resolve=False))
    except Exception:  # only used for hints and for telling '+' on an existing key apart
        return []


def setting_keys(node, prefix: str = "") -> list[str]:
    """Every dotted key of a config (``training.epochs``, ...), for 'did you mean' hints."""
    keys = []
    for k, v in node.items():
        keys.append(prefix + str(k))
        if isinstance(v, dict):
            keys += setting_keys(v, f"{prefix}{k}.")
    return keys


def suggest_keys(name: str, keys: Iterable[str]) -> str:
    """'Did you mean ...' lines for ``keys`` that are not settings of ``name``'s default config."""
    known = _default_keys(name)
    if not known:
        return ""
    hints = []
    for key in keys:
        key = key.split("=", 1)[0].lstrip("+~")
        if key.startswith("hydra") or key in known:
            continue
        close = difflib.get_close_matches(key, known, n=3)
        guess = f"; did you mean {close}?" if close else ""
        hints.append(f"'{key}' is not a setting of '{config_name(name)}'{guess}")
    return "\n".join(hints)
