"""Readable YAML configs: load, merge, override from the command line, dump.

A resolved config is a plain dict (possibly nested). It is built in layers,
later layers winning:

    defaults (in code)  <  config files (in order)  <  command-line overrides

Command-line overrides name existing keys: ``--batch_size 64``,
``--batch_size=64``, ``batch_size=64`` or, for nested keys, ``--optim.lr 1e-3``.
Values are parsed as YAML scalars/lists (``true``, ``1e-4``, ``[1, 2]``,
``null``). ``aliases`` maps other flag names (e.g. a reference release's) to
config keys; an unknown key is a clear error, never silently ignored.

Used by both the pre-training and the fine-tuning commands; the typed,
validated run config is built from the resolved dict by fcmae.runtime.settings.
"""

import argparse
import copy
import difflib
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import yaml

from fcmae.runtime.errors import ConfigError
from fcmae.runtime.files import write_text_atomic

PathLike = Union[str, os.PathLike]


def load_yaml(path: PathLike) -> Dict[str, Any]:
    """Read one YAML mapping; a clear error for a missing, unreadable or non-mapping file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys to values, got {type(data).__name__}")
    return data


def merge_configs(*configs: Mapping[str, Any]) -> Dict[str, Any]:
    """Deep-merge mappings left to right (nested dicts merge, other values replace)."""
    out: Dict[str, Any] = {}
    for cfg in configs:
        for key, value in cfg.items():
            if isinstance(value, Mapping) and isinstance(out.get(key), dict):
                out[key] = merge_configs(out[key], value)
            else:
                out[key] = copy.deepcopy(value)
    return out


def load_config(files: Iterable[PathLike], defaults: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """``defaults`` merged with each YAML file in turn."""
    layers = [defaults or {}] + [load_yaml(f) for f in files]
    return merge_configs(*layers)


def parse_value(text: str) -> Any:
    """A command-line value as YAML would read it ('1e-4' -> 0.0001, 'none'/'null' -> None)."""
    if text.lower() in ("none", "null", "~"):
        return None
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    # YAML 1.1 reads '1e-4' (no dot) as a string; accept it as a float.
    if isinstance(value, str):
        try:
            return float(value) if any(c in value.lower() for c in ".e") else int(value)
        except ValueError:
            return value
    return value


def parse_overrides(
    argv: Sequence[str],
    aliases: Optional[Mapping[str, str]] = None,
    flags: Iterable[str] = (),
) -> Dict[str, Any]:
    """Turn ``--key value`` / ``--key=value`` / ``key=value`` items into {dotted_key: value}.

    ``aliases`` renames keys (``{"model": "size"}``). Keys listed in ``flags``
    are booleans that take no value (``--dry_run`` -> True). A flag with no
    value that is not in ``flags`` is an error.
    """
    aliases = dict(aliases or {})
    flags = set(flags)
    out: Dict[str, Any] = {}
    items = list(argv)
    i = 0
    while i < len(items):
        item = items[i]
        if item.startswith("--"):
            key, has_eq, value = item[2:].partition("=")
            key = key.replace("-", "_") if key not in aliases else key
            if not has_eq:
                if key in flags or aliases.get(key) in flags:
                    value = "true"
                elif i + 1 < len(items) and not items[i + 1].startswith("--"):
                    i += 1
                    value = items[i]
                else:
                    raise ConfigError(f"option --{key} needs a value")
        elif "=" in item:
            key, _, value = item.partition("=")
        else:
            raise ConfigError(f"unexpected argument {item!r}; use --key value or key=value")
        if not key:
            raise ConfigError(f"malformed option {item!r}")
        out[aliases.get(key, key)] = parse_value(value)
        i += 1
    return out


def _split(key: str) -> List[str]:
    return key.split(".")


def apply_overrides(cfg: Mapping[str, Any], overrides: Mapping[str, Any]) -> Dict[str, Any]:
    """A copy of ``cfg`` with dotted-key overrides applied; unknown keys are errors."""
    out = copy.deepcopy(dict(cfg))
    for key, value in overrides.items():
        parts = _split(key)
        node = out
        for depth, part in enumerate(parts[:-1]):
            if not isinstance(node.get(part), dict):
                raise unknown_key_error(key, _flat_keys(out))
            node = node[part]
        if parts[-1] not in node:
            raise unknown_key_error(key, _flat_keys(out))
        node[parts[-1]] = value
    return out


def unknown_key_error(key: str, known: Iterable[str], as_flag: bool = True) -> ConfigError:
    """The error for a setting that does not exist: the closest known name (difflib), else all of them.

    `as_flag`: the key came from the command line, so the suggestion is a flag (`did you mean --epochs?`);
    else a key as config files spell it (`did you mean 'epochs'?`).
    """
    known = sorted(known)
    close = difflib.get_close_matches(key, known, n=1)
    if close:
        return ConfigError(f"unknown config key {key!r}; did you mean "
                           f"{'--' + close[0] if as_flag else repr(close[0])}?")
    return ConfigError(f"unknown config key {key!r}; known keys: {', '.join(known)}")


def parse_args_suggesting(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """`parser.parse_args(argv)`, but an unknown flag near a known one names it (`did you mean --k?`).

    For the commands that read their flags with argparse (fcmae-knn, fcmae-linprobe); exits 2 on bad flags.
    """
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        known = [flag for flag in parser._option_string_actions if flag.startswith("--")]  # argparse's own table
        for item in unknown:
            close = difflib.get_close_matches(item.partition("=")[0], known, n=1) if item.startswith("--") else []
            if close:
                parser.error(f"unrecognized argument {item}; did you mean {close[0]}?")
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    return args


def _flat_keys(cfg: Mapping[str, Any], prefix: str = "") -> List[str]:
    keys = []
    for k, v in cfg.items():
        if isinstance(v, Mapping) and v:
            keys += _flat_keys(v, f"{prefix}{k}.")
        else:
            keys.append(f"{prefix}{k}")
    return keys


def dump_config(cfg: Mapping[str, Any], path: Optional[PathLike] = None) -> str:
    """The config as YAML text (keys in insertion order); also written atomically to ``path``."""
    text = yaml.safe_dump(_plain(cfg), sort_keys=False, default_flow_style=None)
    if path is not None:
        write_text_atomic(path, text)
    return text


def _plain(value: Any) -> Any:
    """Tuples -> lists, Paths -> str, so YAML dumps stay readable and loadable."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return value


def split_positionals(argv: Sequence[str], count: int) -> Tuple[List[str], List[str]]:
    """Up to ``count`` leading arguments that are not options, and the rest."""
    argv = list(argv)
    positionals = []
    while argv and len(positionals) < count and not argv[0].startswith("-") and "=" not in argv[0]:
        positionals.append(argv.pop(0))
    return positionals, argv


def config_root() -> Path:
    """The `configs/` folder: $FCMAE_CONFIG_DIR, else the one next to the installed packages."""
    env = os.environ.get("FCMAE_CONFIG_DIR")
    root = Path(env) if env else Path(__file__).resolve().parents[2] / "configs"
    if not root.is_dir():
        raise ConfigError(f"config folder {root} not found; set FCMAE_CONFIG_DIR to the repository's configs/")
    return root


def choices(folder: PathLike) -> List[str]:
    """Names (without .yaml) of the config files in a folder, sorted."""
    folder = Path(folder)
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []


def named_config(name: str, folder: PathLike) -> Path:
    """`--config NAME`: a file when one has that path, else `folder/NAME.yaml` for a bare name (`small`)."""
    path = Path(name)
    if path.is_file() or path.name != name:
        return path  # a missing path is load_yaml's error
    named = Path(folder) / f"{name}.yaml"
    if not named.is_file():
        names = [n for n in choices(folder) if n != "defaults"]
        raise ConfigError(f"config file not found: {name} (give a YAML file, or one of the names in {folder}: "
                          f"{', '.join(names)})")
    return named


# ---------------------------------------------------------------- default output folders
def data_set_name(data_path: PathLike) -> str:
    """A name for the data set at `data_path`, for folder names: its folder's name (for `.../train`, the one
    above; for tar shards, `DIR/train-{000000..000099}.tar` or `pipe:... URL/train-....tar ...`, the folder
    holding them), with characters other than letters, digits, `.`, `-` and `_` replaced by `_`."""
    text = str(data_path)
    if text.startswith("pipe:"):
        text = next((word for word in reversed(text.split()) if ".tar" in word), "shards")
        path = PurePosixPath(text.split("://", 1)[-1])
    else:
        path = Path(_absolute(data_path))
    if ".tar" in path.name and path.parent.name:
        path = path.parent
    if path.name == "train" and path.parent.name:
        path = path.parent
    return re.sub(r"[^A-Za-z0-9._-]", "_", path.name) or "data"


def default_output_dir(command: str, run_name: str, data_path: Optional[PathLike]) -> str:
    """`output/COMMAND/RUN_NAME`, plus `_DATA` (`data_set_name`) when the run reads a data folder.

    The built-in demo (no data_path) keeps `output/COMMAND/RUN_NAME`, so a run on your own data and the demo
    never share a folder. A run begun before the data set's name was added keeps its folder: when
    `output/COMMAND/RUN_NAME` holds a config.yaml whose data_path is the same folder and the named folder does
    not exist, that folder is the default.
    """
    plain = os.path.join("output", command, run_name)
    if not data_path:
        return plain
    named = f"{plain}_{data_set_name(data_path)}"
    if not os.path.exists(named) and _same_data(Path(plain) / "config.yaml", data_path):
        return plain
    return named


def _same_data(config_file: Path, data_path: PathLike) -> bool:
    """Whether the config.yaml `config_file` (if any) was a run on the folder `data_path`."""
    try:
        stored = yaml.safe_load(config_file.read_text(encoding="utf-8")) if config_file.is_file() else None
    except (OSError, yaml.YAMLError):
        return False
    if not isinstance(stored, dict) or not stored.get("data_path"):
        return False
    return _absolute(stored["data_path"]) == _absolute(data_path)


def _absolute(path: PathLike) -> str:
    return os.path.abspath(os.path.expanduser(str(path)))


# ---------------------------------------------------------------- reference release's flag style
_BOOL_WORDS = {"true": "true", "false": "false", "1": "true", "0": "false", "yes": "true", "no": "false"}


def normalise_reference_flags(argv: Sequence[str], boolean_flags: Sequence[str],
                              ignored_with_value: Sequence[str] = ()) -> List[str]:
    """Rewrite the reference release's flag style for `parse_overrides`.

    `--pin_mem True` (a boolean flag followed by a boolean word) becomes
    `--pin_mem=true`; flags in `ignored_with_value` are removed together with
    their value (`--dist_url env://`, `--local_rank=0`).
    """
    out, i = [], 0
    while i < len(argv):
        item = argv[i]
        name = item[2:].replace("-", "_") if item.startswith("--") and "=" not in item else None
        if name in ignored_with_value:
            i += 2 if i + 1 < len(argv) and not argv[i + 1].startswith("--") else 1
            continue
        if item.startswith("--") and item[2:].partition("=")[0].replace("-", "_") in ignored_with_value:
            i += 1
            continue
        if name in boolean_flags and i + 1 < len(argv) and argv[i + 1].lower() in _BOOL_WORDS:
            out.append(f"{item}={_BOOL_WORDS[argv[i + 1].lower()]}")
            i += 2
            continue
        out.append(item)
        i += 1
    return out


# ---------------------------------------------------------------- a command's command line
@dataclass(frozen=True)
class Flags:
    """How a command's flags are read besides `--key value` (the reference release's names and forms).

    Args:
        aliases: other flag names -> config keys (`--model` -> size).
        boolean: flags that may stand alone (`--dry_run` means true).
        ignored: the reference's flags without meaning here, accepted and dropped.
        ignored_with_value: the same, for flags that take a value (`--dist_url env://`).
    """

    aliases: Dict[str, str]
    boolean: Tuple[str, ...]
    ignored: Tuple[str, ...] = ()
    ignored_with_value: Tuple[str, ...] = ()


def read_command_line(argv: Optional[Sequence[str]], doc: str, flags: Flags,
                      positionals: int) -> Tuple[List[str], Dict[str, Any], List[str]]:
    """(leading positional arguments, {dotted key: value} overrides, extra --config files); -h prints `doc`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print(doc)
        sys.exit(0)
    names, rest = split_positionals(argv, positionals)
    standalone = flags.boolean + flags.ignored
    overrides = parse_overrides(normalise_reference_flags(rest, standalone, flags.ignored_with_value),
                                flags.aliases, standalone)
    for key in flags.ignored + flags.ignored_with_value:
        overrides.pop(key, None)
    extra_files = overrides.pop("config", None) or []
    return names, overrides, [extra_files] if isinstance(extra_files, str) else list(extra_files)


def layered_settings(files: Sequence[Path], overrides: Dict[str, Any]) -> Dict[str, Any]:
    """YAML files merged in order, then the command-line overrides (unknown keys are errors)."""
    return apply_overrides(load_config(files), overrides)
