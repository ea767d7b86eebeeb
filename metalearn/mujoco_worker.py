"""What runs in a MuJoCo worker process (data/mujoco.py), importable without torch.

A worker is forked from Python's ``forkserver``, which imports this module and Gymnasium's MuJoCo environments once:
a module under ``metalearn.data`` would bring torch along (``metalearn.data`` imports it), seconds more before the
first episode (2-5 s on the shared 2-core machine) and a larger process for every worker. Nothing here imports
torch or the rest of metalearn.

* ``EnvSpec``: which Gymnasium environment, with which keyword arguments, scored by which task objective;
* ``task_reward``: a step's reward from the task parameter and Gymnasium's ``info``;
* ``Chunk``: consecutive sub-environments of one process (the trainer's own with ``data.workers=0``);
* ``serve``: a worker's loop over the trainer's commands; a failed command's reply is its exception's one line
  (``summary``) and the traceback.
"""

from __future__ import annotations

import contextlib
import re
import signal
import sys
import traceback
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np


@dataclass(frozen=True)
class EnvSpec:
    """What a process needs to build and score a sub-environment (picklable)."""

    env_id: str  # a Gymnasium id, e.g. HalfCheetah-v5
    kwargs: tuple  # ((name, value), ...) for gymnasium.make: the cost weights
    objective: str  # velocity: -|x_velocity - p0|; direction: p0 * x_velocity


def task_reward(objective: str, param: np.ndarray, info: dict) -> float:
    """The reward of one step of a task with parameter ``param`` from Gymnasium's ``info``: the forward term, then
    Gymnasium's control cost, and its contact cost and survival bonus where the environment has them."""
    velocity = info["x_velocity"]
    forward = -abs(velocity - param[0]) if objective == "velocity" else param[0] * velocity
    return float(forward + info["reward_ctrl"] + info.get("reward_contact", 0.0) + info.get("reward_survive", 0.0))


_shown: set[str] = set()  # the warnings this process has printed, their numbers left out (_warn)


def _warn(text: str) -> None:
    # Gymnasium's half_cheetah.xml uses an attribute MuJoCo 3.3+ calls deprecated, and MuJoCo says so for every
    # environment made (800 lines for one MAML batch): nobody running metalearn can act on it.
    if "settotalmass" in text:
        return
    # MuJoCo warns once per simulator and episode ("... unstable. Time = 0.1500."): an unstable policy would print
    # one line per sub-environment per batch. Once per process for each text, whatever its numbers.
    key = re.sub(r"\d+(\.\d+)?", "#", text)
    if key not in _shown:
        _shown.add(key)
        print(f"MuJoCo warning: {text} (shown once per process)", file=sys.stderr, flush=True)


@contextlib.contextmanager
def mujoco_warnings() -> Iterator[None]:
    """MuJoCo's warnings (a compiler's, a simulation's first "unstable" one) on stderr, each text once per process
    (``_warn``), without the MUJOCO_LOG.TXT its default handler writes into the working directory, and without the
    deprecation above."""
    import mujoco

    previous = mujoco.get_mju_user_warning()
    mujoco.set_mju_user_warning(_warn)
    try:
        yield
    finally:
        mujoco.set_mju_user_warning(previous)


def make(spec: EnvSpec) -> Any:
    """One Gymnasium environment without its wrappers (no time limit: the episode's horizon is the dataset's; no
    checker: actions are clipped by the trainer)."""
    import gymnasium

    with mujoco_warnings():
        return gymnasium.make(spec.env_id, **dict(spec.kwargs)).unwrapped


class Chunk:
    """Consecutive sub-environments of one process: reset(params [n, P], seeds [n]) -> obs [n, O];
    step(actions [n, A]) -> (obs, reward [n], done [n]). Environments are made on first need and kept."""

    def __init__(self, spec: EnvSpec):
        self.spec, self.envs = spec, []
        self.params = self.obs = self.done = None

    def reset(self, params: np.ndarray, seeds: np.ndarray) -> np.ndarray:
        n = len(seeds)
        while len(self.envs) < n:
            self.envs.append(make(self.spec))
        self.params, self.done = params, np.zeros(n, dtype=bool)
        with mujoco_warnings():
            self.obs = np.stack([self.envs[i].reset(seed=int(seeds[i]))[0] for i in range(n)])
        return self.obs

    def step(self, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        reward = np.zeros(len(actions))
        with mujoco_warnings():
            for i, env in enumerate(self.envs[:len(actions)]):
                if self.done[i]:  # the episode ended: its environment waits for the next reset
                    continue
                obs, _, terminated, _, info = env.step(actions[i])
                self.obs[i] = obs
                reward[i] = task_reward(self.spec.objective, self.params[i], info)
                self.done[i] = terminated
        return self.obs.copy(), reward, self.done.copy()

    def close(self) -> None:
        for env in self.envs:
            env.close()
        self.envs = []


def summary(e: BaseException) -> str:
    """One line for an exception: its type and the first line of its message."""
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__


def serve(conn: Any, spec: EnvSpec) -> None:
    """A worker process: run the trainer's commands on its chunk until told to close, or until the trainer has
    gone (its pipe closed, or the trainer process ended: a process forked later may hold the pipe open)."""
    import multiprocessing
    from multiprocessing.connection import wait

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: the trainer decides
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    trainer = multiprocessing.parent_process()  # its sentinel becomes ready when the trainer ends
    watched = [conn] if trainer is None else [conn, trainer.sentinel]
    chunk = Chunk(spec)
    try:
        while conn in wait(watched):
            try:
                command, *args = conn.recv()
            except (EOFError, OSError):  # the trainer has gone
                break
            if command == "close":
                break
            try:
                reply = ("ok", getattr(chunk, command)(*args))
            except Exception as e:  # noqa: BLE001 - handed to the trainer, which raises its first line
                reply = ("error", (summary(e), traceback.format_exc()))
            try:
                conn.send(reply)
            except OSError:
                break
    finally:
        chunk.close()
