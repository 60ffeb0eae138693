"""Settings a command takes from the config stored in a checkpoint, unless the user gave them.

`fcmae-finetune --eval`, `fcmae-knn` and `fcmae-linprobe` evaluate at the
input size, centre crop, channels, normalisation and `.npy` layout that the
checkpoint was trained (or kNN-monitored) with, and fine-tuning starts at its
pre-training checkpoint's input size. Training checkpoints of this project
(fine-tuning and pre-training) store their run's config; files written by
fcmae-convert and other releases' weights do not, and then the command's own
defaults apply.

A setting the user gave wins over the checkpoint's; when the two differ a
one-line note names both, so an evaluation never differs silently from the
training it checks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Collection, Dict, List, Mapping, Optional, Sequence

# What an evaluation takes from the checkpoint it evaluates; fcmae-knn and fcmae-linprobe take the normalisation
# too (fine-tuning's `normalisation` reads it for --eval, where null and auto mean "the checkpoint's").
EVAL_KEYS = ("input_size", "crop_pct", "in_chans", "layout")
PROBE_KEYS = EVAL_KEYS + ("mean", "std")
# What fine-tuning takes from its pre-training checkpoint (crop_pct only where stored: fine-tuning checkpoints).
FINETUNE_KEYS = ("input_size", "crop_pct")


def stored_config(checkpoint: Any) -> Optional[Mapping[str, Any]]:
    """The run config a checkpoint holds (`checkpoint["config"]`), or None (converted files, other releases)."""
    config = checkpoint.get("config") if isinstance(checkpoint, Mapping) else None
    return config if isinstance(config, Mapping) else None


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


@dataclass
class StoredSettings:
    """What `settings_from_checkpoint` found: the values to use and what to print about them."""

    source: str  # the checkpoint in words
    taken: Dict[str, Any] = field(default_factory=dict)  # every stored value used (the user did not give it)
    changes: Dict[str, Any] = field(default_factory=dict)  # those of `taken` that differ from the current values
    notes: List[str] = field(default_factory=list)  # one per given setting whose stored value differs

    def lines(self) -> List[str]:
        """One line naming the values taken (when any), then the notes."""
        taken = ", ".join(f"{key} {value}" for key, value in self.taken.items())
        return ([f"from {self.source}: {taken}"] if taken else []) + self.notes


def settings_from_checkpoint(current: Mapping[str, Any], stored: Optional[Mapping[str, Any]], keys: Sequence[str],
                             given: Collection[str], source: str) -> StoredSettings:
    """The stored values of `keys` that replace `current`'s, and a note for each given one that differs.

    Args:
        current: the command's settings as resolved (defaults, recipe, user's choices).
        stored: the checkpoint's config (`stored_config`); None leaves every setting as it is.
        keys: the settings to take from it (those it lacks or holds as null stay as they are).
        given: the settings the user chose; they stay, with a note where the checkpoint's value differs.
        source: the checkpoint in words, e.g. "the checkpoint out/checkpoint-last.pth".
    """
    found = StoredSettings(source)
    for key in keys:
        value = _plain(stored.get(key)) if stored is not None else None
        if value is None:
            continue
        mine = _plain(current[key])
        if key in given:
            if mine != value:
                found.notes.append(f"note: {key} {mine} as given, {value} in {source}; using {mine}")
            continue
        found.taken[key] = value
        if mine != value:
            found.changes[key] = value
    return found
