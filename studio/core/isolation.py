"""Jobs in a process of their own, so that a native crash or hang ends the job, not the caller.

The studio runs user models through torch/oneDNN, ONNX Runtime and Torch-Pruning graphs of
converted third-party models; a segfault there would end the window (and every model, scan and
plan of the session). :func:`run_isolated` runs a job ``fn(progress, cancel)`` (or a generator
of partial results) in a child process and plays its progress, items and result back on the
calling thread:

- The job is pickled with cloudpickle (closures and lambdas by value), the child is forked from
  multiprocessing's *forkserver*, a clean process that has imported torch and the core but never
  run a parallel op: forking the caller itself would hang (GNU OpenMP cannot run in a child
  forked from a process whose OpenMP threads exist) and could not use CUDA.
- :class:`CancelToken` and :class:`PauseToken` objects the job holds are replaced in the child
  by tokens that follow the caller's: cancelling or pausing here reaches the child within
  ``POLL_S``. A cancelled child that has not stopped ``GRACE_S`` later (stuck in native code) is
  killed, so a cancel takes effect within a second whatever the job is doing.
- A child that dies without a result (a signal, ``os.abort()``, the kernel's OOM killer) raises
  :class:`JobCrashed` naming the job, the signal and the step it was in.

:mod:`studio.core.command_guard` gives the command line the same containment.
"""

from __future__ import annotations

import io
import multiprocessing
import os
import pickle
import signal
import threading
import time
import traceback
import uuid
from collections.abc import Callable
from typing import Any

import cloudpickle

from studio.core.errors import Cancelled, StudioError
from studio.core.jobs import CancelToken, PauseToken, ProgressFn, drain

POLL_S = 0.05  # how often the caller looks at its tokens while a child runs
GRACE_S = 0.3  # a cancelled child that has not ended by then is killed
PROGRESS_EVERY_S = 0.05  # the child sends progress at most this often (and every message change)
PRELOAD = [
    "torch",
    "studio.core.models",  # registers what unpickling an ONNX import needs
    "studio.core.models.load",
    "studio.core.scan.sensitivity",
    "studio.core.prune.engine",
    "studio.core.train.finetune",
    "studio.core.latency.measure",
]

#: what a language model's jobs import when they unpickle it (about 5 s on 2 idle cores, 15 s
#: on busy ones): preloaded only by :func:`preload_transformers`, since CNN users never need it
TRANSFORMERS_PRELOAD = [
    "transformers.modeling_utils",
    "transformers.models.llama.modeling_llama",  # and the attention/cache code every family uses
    "studio.core.models.hf",
]

CHILD_PREFIX = "studio job: "

_lock = threading.Lock()
_context: Any = None


class JobCrashed(StudioError):
    """A job's process ended without a result (a native crash, a kill)."""


class NotIsolatable(Exception):
    """The job cannot be sent to a child process (something in it does not pickle)."""


def available() -> bool:
    """Whether jobs can run in child processes here (POSIX with forkserver)."""
    return "forkserver" in multiprocessing.get_all_start_methods()


def _ctx() -> Any:
    global _context
    with _lock:
        if _context is None:
            ctx = multiprocessing.get_context("forkserver")
            ctx.set_forkserver_preload(PRELOAD)
            _skip_main_in_jobs()
            _context = ctx
        return _context


def _skip_main_in_jobs() -> None:
    """A job's child does not run the caller's ``__main__`` again (multiprocessing does, for
    its functions; ours are pickled by value): the studio's script, pytest or a benchmark."""
    from multiprocessing import spawn

    original = spawn.get_preparation_data
    if getattr(original, "studio", False):
        return

    def preparation_data(name: str) -> dict[str, Any]:
        data = original(name)
        if name.startswith(CHILD_PREFIX):
            data.pop("init_main_from_path", None)
            data.pop("init_main_from_name", None)
        return data

    preparation_data.studio = True  # type: ignore[attr-defined]
    spawn.get_preparation_data = preparation_data


def preload_transformers() -> bool:
    """Have job processes start with transformers imported, so that each job of a transformer
    starts seconds sooner. It takes effect only before the forkserver starts (the first job, or
    :func:`warm_up`); returns whether it did."""
    if not available():
        return False
    from multiprocessing import forkserver

    with _lock:
        if getattr(forkserver._forkserver, "_forkserver_pid", None) is not None:
            return all(m in PRELOAD for m in TRANSFORMERS_PRELOAD)
        PRELOAD.extend(m for m in TRANSFORMERS_PRELOAD if m not in PRELOAD)
        if _context is not None:
            _context.set_forkserver_preload(PRELOAD)
    return True


def warm_up() -> None:
    """Start the forkserver (imports torch and the core once: 1-3 s) so the first job starts
    fast; safe to call from any thread, and more than once."""
    if available():
        from multiprocessing import forkserver

        _ctx()
        forkserver.ensure_running()


# ---- pickling: tokens travel by key -----------------------------------------------------------


class _JobPickler(cloudpickle.Pickler):
    """cloudpickle, with every cancel or pause token replaced by a key the child resolves."""

    def __init__(self, file: io.BytesIO, tokens: dict[str, Any]) -> None:
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self.tokens = tokens
        self.keys: dict[int, str] = {}  # id(token) -> its key

    def persistent_id(self, obj: Any) -> Any:
        if not isinstance(obj, (CancelToken, PauseToken)):
            return None
        key = self.keys.get(id(obj))
        if key is None:
            key = self.keys[id(obj)] = uuid.uuid4().hex
            self.tokens[key] = obj
        return ("token", key, type(obj).__name__, _state(obj))


def _state(token: CancelToken | PauseToken) -> bool:
    return token.cancelled if isinstance(token, CancelToken) else token.paused


class _JobUnpickler(pickle.Unpickler):
    def __init__(self, file: io.BytesIO, tokens: dict[str, Any]) -> None:
        super().__init__(file)
        self.tokens = tokens

    def persistent_load(self, pid: Any) -> Any:
        _, key, kind, state = pid
        if key not in self.tokens:
            token: CancelToken | PauseToken
            token = CancelToken() if kind == "CancelToken" else PauseToken()
            if state:
                token.cancel() if isinstance(token, CancelToken) else token.pause()
            self.tokens[key] = token
        return self.tokens[key]


def _dumps(obj: Any, tokens: dict[str, Any]) -> bytes:
    buf = io.BytesIO()
    _JobPickler(buf, tokens).dump(obj)
    return buf.getvalue()


# ---- the caller's side ---------------------------------------------------------------------


def run_isolated(
    name: str,
    fn: Callable[[ProgressFn, CancelToken], Any],
    progress: ProgressFn | None = None,
    cancel: CancelToken | None = None,
    on_item: Callable[[Any], None] | None = None,
) -> Any:
    """Run ``fn(progress, cancel)`` in a child process and return its result.

    With ``on_item``, ``fn`` returns a generator: each item it yields is passed to
    ``on_item`` here, and the generator's ``return`` value is the result. Exceptions the job
    raises are raised here; :class:`Cancelled` when ``cancel`` is set (within ``GRACE_S`` +
    ``POLL_S``, killing the child if it does not stop); :class:`JobCrashed` when the child
    dies; :class:`NotIsolatable` (before anything ran) when the job does not pickle.
    """
    cancel = cancel or CancelToken()
    tokens: dict[str, Any] = {}
    try:
        payload = _dumps((fn, on_item is not None, cancel), tokens)
    except Exception as exc:  # a Qt object, a lock, an open file... in the job's closure
        raise NotIsolatable(f"{type(exc).__name__}: {exc}") from None
    ctx = _ctx()
    control_r, control_w = ctx.Pipe(duplex=False)
    results_r, results_w = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_child_main, args=(control_r, results_w), name=CHILD_PREFIX + name)
    child.daemon = True
    child.start()
    control_r.close()
    results_w.close()
    step = "starting"
    send_lock = threading.Lock()
    forwarded = {key: _state(t) for key, t in tokens.items()}

    def forward() -> None:  # the caller's tokens reach the child (on the changing thread)
        with send_lock:
            for key, token in tokens.items():
                state = _state(token)
                if state != forwarded[key]:
                    forwarded[key] = state
                    try:
                        control_w.send((key, state))
                    except OSError:  # the child has ended
                        pass

    unwatch: list[Callable[[], None]] = []
    try:
        control_w.send_bytes(payload)  # first: the child reads the job, then token changes
        unwatch = [token.watch(forward) for token in tokens.values()]
        forward()  # a change between pickling and watching
        cancelled_at: float | None = None
        while True:
            if cancel.cancelled and cancelled_at is None:
                cancelled_at = time.monotonic()
            if cancelled_at is not None and time.monotonic() - cancelled_at > GRACE_S:
                _kill(child)
                raise Cancelled()
            if not results_r.poll(POLL_S):
                continue
            try:
                message = _loads(results_r.recv_bytes())
            except (EOFError, OSError):
                if cancel.cancelled:
                    raise Cancelled() from None
                raise _crashed(name, child, step) from None
            kind = message[0]
            if kind == "progress":
                step = message[2] or step
                if progress is not None:
                    progress(message[1], message[2])
            elif kind == "item":
                assert on_item is not None
                on_item(message[1])
            elif kind == "done":
                return message[1]
            elif kind == "cancelled":
                raise Cancelled()
            elif kind == "failed":
                raise message[1]
    finally:
        for stop in unwatch:
            stop()
        with send_lock:
            for conn in (control_w, results_r):
                conn.close()
        child.join(GRACE_S)
        if child.is_alive():
            _kill(child)


def _kill(child: Any) -> None:
    try:
        child.kill()
    except (OSError, ValueError):
        pass
    child.join(1.0)


def _crashed(name: str, child: Any, step: str) -> JobCrashed:
    child.join(2.0)
    code = child.exitcode
    if code is not None and code < 0:
        try:
            how = signal.Signals(-code).name
        except ValueError:
            how = f"signal {-code}"
    else:
        how = f"exit status {code}" if code is not None else "no exit status"
    return JobCrashed(
        f"{name} crashed in native code ({how}) during '{step}'; the session is unchanged"
    )


# ---- the child's side ----------------------------------------------------------------------


def _child_main(control: Any, results: Any) -> None:
    send_lock = threading.Lock()

    def send(message: tuple[Any, ...]) -> None:
        data = cloudpickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        with send_lock:
            results.send_bytes(data)

    tokens: dict[str, Any] = {}
    try:
        payload = control.recv_bytes()
        fn, stream, cancel = _loads(payload, lambda b: _JobUnpickler(io.BytesIO(b), tokens).load())
    except Exception as exc:
        send(("failed", StudioError(f"the job could not start in its process: {exc}")))
        return
    threading.Thread(target=_follow, args=(control, tokens), daemon=True).start()
    last = [0.0, ""]
    held: list[tuple[Any, ...]] = []  # the latest report dropped by the rate limit

    def progress(fraction: float, message: str = "") -> None:
        now = time.monotonic()
        report = ("progress", float(fraction), str(message))
        held.clear()
        if message == last[1] and now - last[0] < PROGRESS_EVERY_S and fraction < 1.0:
            held.append(report)  # sent before anything else, so the last report arrives
            return
        last[0], last[1] = now, message
        send(report)

    def send_after_progress(message: tuple[Any, ...]) -> None:
        if held:
            send(held.pop())
        send(message)

    try:
        if stream:
            result = drain(fn(progress, cancel), cancel, lambda i: send_after_progress(("item", i)))
        else:
            result = fn(progress, cancel)
        send_after_progress(("done", result))
    except Cancelled:
        send(("cancelled",))
    except BaseException as exc:  # noqa: BLE001 - every failure goes back to the caller
        send(("failed", _sendable(exc)))


_MISSING_MODULE_FIXES: dict[str, Callable[[], object]] = {}


def on_missing_module(name: str, fix: Callable[[], object]) -> None:
    """When a job or its result cannot be unpickled because module ``name`` is missing, call
    ``fix`` and try once more. A stage registers how to import what its objects need: a model
    converted from ONNX holds onnx2torch modules, and importing onnx2torch imports torchvision,
    which the studio stands in for while it imports it (``models.onnx_converters``)."""
    _MISSING_MODULE_FIXES[name] = fix


def _loads(data: bytes, load: Callable[[bytes], Any] = pickle.loads) -> Any:
    """Unpickle a job or its result (see :func:`on_missing_module`)."""
    try:
        return load(data)
    except ModuleNotFoundError as missing:
        fix = _MISSING_MODULE_FIXES.get(missing.name or "")
        if fix is None:
            raise
    fix()
    return load(data)


def _sendable(exc: BaseException) -> BaseException:
    """``exc`` when it pickles (with its traceback text), else a StudioError with its text."""
    text = "".join(traceback.format_exception(exc))
    try:
        cloudpickle.dumps(exc)
        exc.add_note(f"in the job's process:\n{text}")
        return exc
    except Exception:
        first = str(exc).splitlines()[0] if str(exc) else ""
        return RuntimeError(f"{type(exc).__name__}: {first}")


def _follow(control: Any, tokens: dict[str, Any]) -> None:
    """Apply the caller's token changes in the child (a daemon thread)."""
    while True:
        try:
            key, state = control.recv()
        except (EOFError, OSError):  # the caller is gone: nothing is waiting for the result
            os._exit(1)
        token = tokens.get(key)
        if isinstance(token, CancelToken) and state:
            token.cancel()
        elif isinstance(token, PauseToken):
            token.pause() if state else token.resume()
