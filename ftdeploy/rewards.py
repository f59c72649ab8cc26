"""GRPO's reward functions (train.method grpo; the grpo section's `rewards`): loading them, calling them as TRL's
GRPOTrainer calls them with what they return checked, and the bundled example for the demo's arithmetic task.

A reward is given as `module:function` (an importable module: `ftdeploy.rewards:exact_answer`, or a module of your
own on the Python path) or `path/to/file.py:function` (a Python file, resolved against the working directory and
imported under a private module name, so it needs no package and cannot shadow one).

The call is TRL 1.16's (GRPOTrainer._calculate_rewards), keyword arguments only, one list entry per completion:

  prompts         each completion's prompt: a list of chat messages (the row's system turn, if any, first)
  completions     each completion: a list holding one assistant message, {"role": "assistant", "content": text}
  completion_ids  each completion's token ids (verify passes the ids of the answer in the merged model's tokenizer)
  <column>=       every other column of the training rows: `answer`, and whatever else the rows carry (None where a
                  row lacks it); each prompt's row is repeated for each of its grpo.num_generations completions
  trainer_state, log_extra, log_metric
                  TRL's: the trainer's state, and hooks that log an extra column or metric (in verify: None, and
                  hooks that do nothing)

A function takes the arguments it reads by name and the rest as **kwargs, and returns one reward per completion: a
number, or None where it does not apply (TRL leaves a None out of that function's mean; a completion every function
scores None gets no advantage). Anything else (an exception, a value that is not a list, a list of the wrong length,
an item that is not a number or None, an infinite number) is a RewardError naming the function and the rows it was
scoring, raised where training (or verify) called it. An `async def` function is run to completion.

The example (the demo's arithmetic task, ftdeploy/assets/demo/arithmetic.jsonl; grpo.rewards' default):
`format_reward` and `exact_answer`, quoted by the README.

Pure: no torch.
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib
import importlib.util
import inspect
import json
import math
import re
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .errors import ConfigError, RewardError

# The training rows' own column (the data stage's source and columns, as JSON text: one string column keeps the
# Arrow table TRL reads from typing each user column across rows); the wrapper unpacks it into the columns.
ROW_COLUMN = "ftdeploy_row"
# Names TRL gives a reward function itself, or reads from a row for itself: a data column may not take one.
RESERVED_COLUMNS = ("prompt", "prompts", "completion", "completions", "completion_ids", "trainer_state", "log_extra",
                    "log_metric", "environments", "environment", "image", "images", ROW_COLUMN)
_FILE_MODULES: dict[Path, Any] = {}  # a file imported once, however many of its functions are rewards


# ---------------------------------------------------------------- loading


def load_rewards(specs: Sequence[str], key: str = "grpo.rewards") -> list[Reward]:
    """Each `module:function` or `file.py:function` of `specs`, loaded and checked (ConfigError naming `key`)."""
    if not specs:
        raise ConfigError(f"{key}: no reward functions; GRPO trains toward what they score (e.g. "
                          f"{', '.join(EXAMPLE_SPECS)})")
    rewards = [load_reward(spec, key) for spec in specs]
    names = [r.__name__ for r in rewards]
    if len(set(names)) < len(names):
        twice = sorted({n for n in names if names.count(n) > 1})
        raise ConfigError(f"{key}: two reward functions are named {', '.join(twice)} (TRL logs each reward under "
                          "its function's name); rename one")
    return rewards


def load_reward(spec: str, key: str = "grpo.rewards") -> Reward:
    where, sep, name = str(spec).strip().rpartition(":")
    if not sep or not where or not name.isidentifier():
        raise ConfigError(f"{key}: {spec!r} is not module:function or path/to/file.py:function")
    module = _import_file(where, spec, key) if _is_file(where) else _import_module(where, spec, key)
    if not hasattr(module, name):
        found = sorted(n for n, v in vars(module).items() if inspect.isfunction(v) and not n.startswith("_"))
        listed = f"; its functions: {', '.join(found[:12])}" if found else "; it defines no functions"
        raise ConfigError(f"{key}: {spec!r}: {where} has no {name!r}{listed}")
    fn = getattr(module, name)
    if inspect.isclass(fn) or not callable(fn):
        what = "a class (give a function, or an instance of the class)" if inspect.isclass(fn) else \
            f"a {type(fn).__name__}, not a function"
        raise ConfigError(f"{key}: {spec!r} is {what}")
    return Reward(fn, spec)


def _is_file(where: str) -> bool:
    return where.endswith(".py") or "/" in where or "\\" in where


def _import_module(where: str, spec: str, key: str) -> Any:
    try:
        return importlib.import_module(where)
    except ModuleNotFoundError as exc:
        if exc.name and where.startswith(exc.name):
            raise ConfigError(f"{key}: {spec!r}: no module named {where!r} (a module on the Python path, or a "
                              "path/to/file.py)") from None
        raise ConfigError(f"{key}: {spec!r}: importing {where} failed: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - the user's module: whatever it raises is reported with its place
        raise ConfigError(f"{key}: {spec!r}: importing {where} failed: {_described(exc)}") from None


def _import_file(where: str, spec: str, key: str) -> Any:
    path = Path(where).expanduser()
    path = (path if path.is_absolute() else Path.cwd() / path).resolve()
    if path in _FILE_MODULES:
        return _FILE_MODULES[path]
    if not path.is_file():
        raise ConfigError(f"{key}: {spec!r}: no such file {path} (a relative path is read from the working "
                          "directory)")
    name = f"_ftdeploy_reward_{hashlib.sha256(str(path).encode()).hexdigest()[:12]}"
    loader_spec = importlib.util.spec_from_file_location(name, path)
    if loader_spec is None or loader_spec.loader is None:
        raise ConfigError(f"{key}: {spec!r}: {path} cannot be imported as Python (name it *.py)")
    module = importlib.util.module_from_spec(loader_spec)
    sys.modules[name] = module  # dataclasses and pickling look a module up by name
    try:
        loader_spec.loader.exec_module(module)
    except Exception as exc:  # noqa: BLE001 - the user's file: whatever it raises is reported with its place
        sys.modules.pop(name, None)
        raise ConfigError(f"{key}: {spec!r}: importing {path} failed: {_described(exc)}") from None
    _FILE_MODULES[path] = module
    return module


def reward_sources(specs: Sequence[str]) -> list[str | None]:
    """Each reward's source file as a sha256, without importing it: editing a reward function trains (and verifies)
    again. A module's file is found on the Python path (None where it is not found: loading names it)."""
    digests: list[str | None] = []
    for spec in specs:
        where = str(spec).strip().rpartition(":")[0]
        if _is_file(where):
            local = Path(where).expanduser()
            path: Path | None = local if local.is_absolute() else Path.cwd() / local
        else:
            try:
                found = importlib.util.find_spec(where)
            except (ImportError, ValueError):
                found = None
            path = Path(found.origin) if found is not None and found.origin else None
        digests.append(hashlib.sha256(path.read_bytes()).hexdigest() if path is not None and path.is_file() else None)
    return digests


def _described(exc: BaseException) -> str:
    """`ValueError: message (at file.py:12)`: the exception, and the line of the innermost frame it came from."""
    frames = traceback.extract_tb(exc.__traceback__)
    at = f" (at {Path(frames[-1].filename).name}:{frames[-1].lineno})" if frames else ""
    return f"{type(exc).__name__}: {str(exc)[:300]}{at}"


# ---------------------------------------------------------------- calling


def _no_op(*args: Any, **kwargs: Any) -> None:
    """log_extra and log_metric outside training: nothing to log to."""


class Reward:
    """A loaded reward function, called with TRL's arguments, its answer checked: a list of one float (or None) per
    completion, or a RewardError naming it. Its `__name__` is the function's, which TRL logs the reward under
    (rewards/<name>/mean)."""

    def __init__(self, fn: Callable[..., Any], spec: str):
        self.fn, self.spec = fn, spec
        self.__name__ = getattr(fn, "__name__", type(fn).__name__)

    def __repr__(self) -> str:
        return f"Reward({self.spec!r})"

    def __call__(self, prompts: list[Any], completions: list[Any], **kwargs: Any) -> list[float | None]:
        """As GRPOTrainer calls it: the data stage's rows come as ROW_COLUMN, unpacked here into their columns."""
        packed = kwargs.pop(ROW_COLUMN, None)
        rows = [json.loads(r) if isinstance(r, str) else {} for r in packed] if packed is not None else None
        return self.score(prompts, completions, rows, **kwargs)

    def score(self, prompts: list[Any], completions: list[Any], rows: list[dict[str, Any]] | None = None,
              completion_ids: list[list[int]] | None = None, **hooks: Any) -> list[float | None]:
        """The rewards of the completions; `rows`: each completion's row, {"source": "file:line", "columns": {...}}
        (its columns become the keyword arguments); `hooks`: TRL's trainer_state, log_extra and log_metric (and any
        other column given as it is), each defaulted as in verify."""
        kwargs: dict[str, Any] = {"trainer_state": None, "log_extra": _no_op, "log_metric": _no_op,
                                  **row_columns(rows or []), **hooks}
        try:
            out = self.fn(prompts=prompts, completions=completions, completion_ids=completion_ids, **kwargs)
            if inspect.isawaitable(out):
                out = asyncio.run(_awaited(out))
        except Exception as exc:  # noqa: BLE001 - the user's function: whatever it raises is named with it
            raise RewardError(f"{self._label()} raised {_described(exc)}{_scoring(rows)}") from exc
        return self._checked(out, len(completions), rows)

    def _label(self) -> str:
        return f"reward function {self.__name__} ({self.spec})"

    def _checked(self, out: Any, n: int, rows: list[dict[str, Any]] | None) -> list[float | None]:
        if hasattr(out, "tolist") and not isinstance(out, list):  # a numpy array or a tensor
            out = out.tolist()
        if not isinstance(out, list | tuple):
            raise RewardError(f"{self._label()} returned {type(out).__name__} {_short(out)}, not a list: it must "
                              f"return one reward (a number, or None) per completion, {n} here{_scoring(rows)}")
        if len(out) != n:
            raise RewardError(f"{self._label()} returned {len(out)} rewards for {n} completions: it must return one "
                              f"reward (a number, or None) per completion{_scoring(rows)}")
        checked: list[float | None] = []
        for i, value in enumerate(out):
            if value is None or (isinstance(value, float) and math.isnan(value)):
                checked.append(None)
                continue
            if not isinstance(value, int | float) and not _is_number(value):
                raise RewardError(f"{self._label()} returned {type(value).__name__} {_short(value)} as reward {i}: "
                                  f"each reward is a number, or None where it does not apply{_scoring(rows)}")
            number = float(value)
            if math.isinf(number):
                raise RewardError(f"{self._label()} returned {number} as reward {i}: a reward must be finite (None "
                                  f"where it does not apply){_scoring(rows)}")
            checked.append(number)
        return checked


async def _awaited(awaitable: Any) -> Any:
    return await awaitable


def _is_number(value: Any) -> bool:
    """A numpy or torch scalar (anything float() takes that is not text)."""
    if isinstance(value, str | bytes) or not hasattr(value, "__float__"):
        return False
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _scoring(rows: list[dict[str, Any]] | None) -> str:
    """` scoring the completions of data.jsonl:3, data.jsonl:9`: where the rows of the failed call came from."""
    sources = list(dict.fromkeys(str(r.get("source")) for r in rows or () if r.get("source")))
    if not sources:
        return ""
    more = f" and {len(sources) - 3} more" if len(sources) > 3 else ""
    return f", scoring the completions of {', '.join(sources[:3])}{more}"


def row_columns(rows: list[dict[str, Any]]) -> dict[str, list[Any]]:
    """The rows' columns as keyword arguments: each column name (in order of first appearance) with one value per
    row, None where a row lacks it."""
    names: dict[str, None] = {}
    for row in rows:
        names.update(dict.fromkeys(row.get("columns") or {}))
    return {name: [(row.get("columns") or {}).get(name) for row in rows] for name in names}


def completion_text(completion: Any) -> str:
    """A completion as text: a string as it is, a list of messages as their contents joined (TRL gives a
    conversational prompt's completion as [{"role": "assistant", "content": text}])."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        return str(completion.get("content") or "")
    if isinstance(completion, list):
        return "".join(completion_text(m) for m in completion)
    return ""


# ---------------------------------------------------------------- the example: small arithmetic word problems

# The answer shape the demo's prompts ask for: a final line `Answer: <number>`.
ANSWER_LINE = re.compile(r"^\s*answer\s*:\s*(-?\d[\d,]*(?:\.\d+)?)\s*\.?\s*$", re.IGNORECASE)
NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def _answer_number(text: str) -> float | None:
    """The number of the last `Answer: <number>` line of a text, or None."""
    for line in reversed(text.splitlines()):
        if match := ANSWER_LINE.match(line):
            return _number(match.group(1))
    return None


def _number(text: str) -> float | None:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


def format_reward(completions: list[Any], **kwargs: Any) -> list[float]:
    """Rewards the answer shape the prompts ask for: 1.0 when the completion's last non-empty line is
    `Answer: <number>` (e.g. `Answer: 42`; any case, a trailing full stop allowed), 0.5 when such a line is there but
    not last, 0.0 when there is none. It reads nothing but the completion, so it scores any task that asks for a
    final `Answer:` line."""
    rewards = []
    for completion in completions:
        lines = [line for line in completion_text(completion).splitlines() if line.strip()]
        if lines and ANSWER_LINE.match(lines[-1]):
            rewards.append(1.0)
        else:
            rewards.append(0.5 if any(ANSWER_LINE.match(line) for line in lines) else 0.0)
    return rewards


def exact_answer(completions: list[Any], answer: list[Any] | None = None, **kwargs: Any) -> list[float | None]:
    """Rewards the right result: 1.0 when the number on the completion's last `Answer: <number>` line equals the
    row's `answer` column, 0.0 when it differs or the completion has no such line. The `answer` column is a number
    or text: text is read as its own `Answer:` line's number, else its last number (so an SFT row's final assistant
    turn, which the data stage keeps as `answer`, works too). None (not applicable) for a row without an answer."""
    answers = answer if answer is not None else [None] * len(completions)
    rewards: list[float | None] = []
    for completion, expected in zip(completions, answers, strict=True):
        target = _expected_number(expected)
        if target is None:
            rewards.append(None)
            continue
        got = _answer_number(completion_text(completion))
        rewards.append(1.0 if got is not None and abs(got - target) <= 1e-6 * max(1.0, abs(target)) else 0.0)
    return rewards


def _expected_number(value: Any) -> float | None:
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        found = _answer_number(value)
        if found is not None:
            return found
        numbers = NUMBER.findall(value)
        return _number(numbers[-1]) if numbers else None
    return None


EXAMPLE_REWARDS = (format_reward, exact_answer)
EXAMPLE_SPECS = tuple(f"{__name__}:{fn.__name__}" for fn in EXAMPLE_REWARDS)  # grpo.rewards' default
