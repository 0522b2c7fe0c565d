"""The ``sparseformer`` command line: argparse sub-commands that call library functions.

Each sub-command lives in its own module with ``register(subparsers)``; the module imports its
heavy dependencies inside the handler so that ``sparseformer --help`` stays fast.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import io
import logging
import os
import re
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["main", "COMMANDS", "CliError", "check_output"]

# module name under sparseformer.cli, in the order --help lists them
COMMANDS = (
    *("models", "info", "convert", "train", "bootstrap", "eval", "predict"),
    *("demo", "bench", "viz", "export"),
)


class CliError(Exception):
    """An error to show the user as one line (no traceback)."""


def check_output(
    path: str | os.PathLike,
    flag: str,
    *,
    folder: bool = False,
    kinds: tuple[str, ...] | None = None,
) -> None:
    """:func:`sparseformer.engine.output_paths.check_output_path`, before any work.

    Raises:
        CliError: naming ``flag``, the path and the problem.
    """
    from sparseformer.engine.output_paths import check_output_path

    try:
        check_output_path(path, flag, folder=folder, kinds=kinds)
    except ValueError as exc:
        raise CliError(str(exc)) from None


def _stdout_closed() -> bool:
    """Whether standard output is a pipe whose reader has gone; if so, point it at /dev/null
    so that the interpreter's last flush cannot fail again."""
    try:
        sys.stdout.flush()
        if not _reader_gone():  # a failed write drops its buffer: the flush alone can pass
            return False
    except BrokenPipeError:
        pass
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError):  # a replaced stdout (a notebook) has no descriptor
        pass
    return True


def _reader_gone() -> bool:
    """Whether standard output is a pipe with no reader left (poll reports an error on its
    write end; systems without poll() are taken as not)."""
    import select

    try:
        poll = select.poll()
        poll.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poll.poll(0))
    except (AttributeError, OSError, ValueError):  # no poll(), or no descriptor (a notebook)
        return False


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sparseformer",
        description="SparseFormer (ICLR 2024): models, weights, training and tools.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    from sparseformer import __version__  # the installed package's metadata

    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"sparseformer.cli.{name}").register(sub)
    for command in sub.choices.values():  # the modules' docstrings, as a terminal shows text
        command.description = _plain_text(command.description)
    parser.set_defaults(commands=sub.choices)  # for an error in a command's own words
    return parser


def _plain_text(doc: str | None) -> str | None:
    """A docstring's reST as plain text: ``code`` -> `code`, :func:`~a.b` -> `b`."""
    if doc is None:
        return None
    doc = re.sub(r":\w+:`~?([^`]+)`", lambda m: f"`{m.group(1).rsplit('.', 1)[-1]}`", doc)
    return doc.replace("``", "`")


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("PIL", "matplotlib"):  # -v is ours: not a line per PNG chunk or font
        logging.getLogger(noisy).setLevel(max(logging.getLogger(noisy).level, logging.INFO))


class _Terminated(Exception):
    """A SIGTERM held while torch imported (:func:`deferred_interrupt`)."""


def main(argv: list[str] | None = None) -> int:
    try:
        code = _main(argv)
    except KeyboardInterrupt:  # a Ctrl-C before a command began (its imports, the parsing)
        print("sparseformer: interrupted", file=sys.stderr)
        code = 130
    except _Terminated:  # a scheduler's SIGTERM as early: a line, not a silent end
        print("sparseformer: stopped by SIGTERM", file=sys.stderr)
        code = 128 + signal.SIGTERM
    finally:  # after an error raised on too (a bug's traceback): the exit must not wait
        if argv is None:  # the program itself: its work is done and said; a Ctrl-C now
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # would only make its status -2
            _end_data_workers()
    return code


def _one_line(exc: BaseException) -> str:
    """``exc``'s message; for an error raised in a data-loading worker, which PyTorch raises
    again with the worker's whole traceback in the message, its own last line; for a path
    too long, what to do ("[Errno 36] File name too long" does not say)."""
    for cause in (exc, exc.__cause__):  # a command's CliError may carry the OSError
        if isinstance(cause, OSError) and cause.errno == errno.ENAMETOOLONG and cause.filename:
            return _too_long(str(cause.filename))
    text = str(exc)
    if "Original Traceback (most recent call last)" not in text:
        return text
    last = text.strip().splitlines()[-1]  # "module.ErrorType: message"
    return last.partition(": ")[2] or last


def _too_long(path: str) -> str:
    """What to say of a path the file system refused as too long (ENAMETOOLONG)."""
    longest = max((len(part.encode()) for part in Path(path).parts), default=0)
    if longest > 255:  # most file systems' NAME_MAX
        why = f"a file or folder name in it is {longest} bytes, over most file systems' 255"
    else:
        why = f"it is {len(path.encode())} bytes, over what the system allows for a whole path"
    return f"{path!r}: {why}; shorten it"


def _end_data_workers() -> None:
    """End the data-loading workers a command left behind when it failed (an error raised
    in a worker, kept alive by the error's traceback): they ignore SIGTERM (the main process
    stops a run), so Python's exit, which terminates and then waits for them, would wait
    forever. The command is over: they are killed (a successful command has shut its own
    down already). PyTorch's SIGCHLD handler, which raises when a worker dies by a signal,
    is set aside first: raised inside the first join, it left the others alive, and the exit
    waiting for them."""
    import multiprocessing

    if hasattr(signal, "SIGCHLD"):  # POSIX
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for child in multiprocessing.active_children():
        child.kill()
        child.join(timeout=5)


@contextmanager
def deferred_interrupt() -> Iterator[None]:
    """Hold a Ctrl-C (SIGINT) or a SIGTERM that arrives inside the block, and raise it when
    the block ends (KeyboardInterrupt; :class:`_Terminated`, which :func:`main` says in a
    line). ``import torch`` swallows a KeyboardInterrupt raised while it imports numpy and goes
    on with numpy half loaded: a Ctrl-C in the first second was ignored, or the run failed
    later with errors from inside numpy; and a SIGTERM then ended the process in silence. (In
    the main thread only: elsewhere no signal handler can be set, and none is needed.)"""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    signals = (signal.SIGINT, signal.SIGTERM)
    previous = {s: signal.signal(s, lambda signum, frame: received.append(signum)) for s in signals}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
    if received:
        raise KeyboardInterrupt if received[0] == signal.SIGINT else _Terminated()


def _names_as_on_disk() -> None:
    """Print file names as the file system holds them: bytes that are not UTF-8 (a folder
    zipped on Windows; Python keeps them as surrogate escapes) go out unchanged, as ``ls``
    prints them, instead of failing the print with a UnicodeEncodeError."""
    for stream in (sys.stdout, sys.stderr):
        if isinstance(stream, io.TextIOWrapper) and stream.errors == "strict":
            stream.reconfigure(errors="surrogateescape")


def _empty_argument(argv: list[str], parser: argparse.ArgumentParser) -> str | None:
    """What an empty argument was given for, or ``None``. An empty path is the working folder
    to pathlib: `predict "$IMG"` with IMG unset classified every file below it, and an empty
    --output would have made it the run folder. An option is named when ``parser`` (the
    command's) says it takes a value."""
    takes = {name for name, action in parser._option_string_actions.items() if action.nargs != 0}
    for i, arg in enumerate(argv):
        if arg == "":
            before = argv[i - 1] if i else ""
            # an abbreviation argparse takes (--out for --output) is named by the option
            named = [o for o in takes if o.startswith(before)] if before.startswith("--") else []
            option = before if before in takes else named[0] if len(named) == 1 else None
            return f"{option} is given an empty value" if option else "an empty argument"
        name, eq, value = arg.partition("=")
        if name.startswith("--") and eq and not value:
            return f"{name} is given an empty value"
    return None


def _main(argv: list[str] | None) -> int:
    _names_as_on_disk()
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    commands = vars(args).pop("commands")  # the parsers, not a setting of the command
    where = commands.get(args.command, parser)  # errors in the command's words and usage
    if (empty := _empty_argument(sys.argv[1:] if argv is None else argv, where)) is not None:
        where.error(f"{empty}: an unset shell variable? give a value")
    if unknown:  # said by the command's parser, with its usage, not the program's
        hint = " (-v goes before the command: sparseformer -v COMMAND ...)"
        where.error(f"unrecognized arguments: {' '.join(unknown)}"
                    f"{hint if {'-v', '--verbose'} & set(unknown) else ''}")  # fmt: skip
    if args.command is None:
        parser.print_help()
        return 2
    setup_logging(args.verbose)
    with deferred_interrupt():  # every command needs these: imported whole, or not at all
        import torch  # noqa: F401

        from sparseformer.engine.distributed import launched_rank
        from sparseformer.engine.stopping import RunStopped, setup_signals
        from sparseformer.weights.convert import CheckpointError
        from sparseformer.weights.factory import UnknownModelError
        from sparseformer.weights.hub import DownloadError

    rank, world = launched_rank()
    if args.command not in DISTRIBUTED and world > 1:
        if rank == 0:  # one line, not one per process
            print(
                f"sparseformer {args.command}: error: runs in one process (only train and "
                "bootstrap run under torchrun); run it without torchrun (from a script that "
                "torchrun started, with RANK and WORLD_SIZE unset for it)",
                file=sys.stderr,
            )
        return 1
    try:
        with setup_signals():  # a signal swallowed on the way still stops a run before training
            return int(args.func(args) or 0)
    except BrokenPipeError as exc:
        if not _stdout_closed():  # another pipe (a worker's, a socket): an error as any other
            print(f"sparseformer {args.command}: error: {exc}", file=sys.stderr)
        return 1  # `sparseformer info ... | head`: the reader left; nothing to say to it
    except (CliError, CheckpointError, UnknownModelError, DownloadError, OSError) as exc:
        print(f"sparseformer {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return 1
    except (ValueError, TypeError, OverflowError) as exc:  # bad values met late: one line
        logging.getLogger(__name__).debug("traceback", exc_info=True)
        print(f"sparseformer {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return 1
    except RunStopped as exc:  # a signal, met at a step boundary: 128 + signum, as a shell
        if rank == 0:  # every process stops: one says so
            print(f"sparseformer {args.command}: {exc}{_resume_hint(args)}", file=sys.stderr)
        return 128 + exc.signum
    except KeyboardInterrupt:
        if rank == 0:
            print(f"sparseformer {args.command}: interrupted{_resume_hint(args)}", file=sys.stderr)
        return 130
    except (RuntimeError, MemoryError) as exc:
        line = _runtime_error_line(exc)
        if line is None:  # torch's own message: a bug, traced
            raise
        logging.getLogger(__name__).debug("traceback", exc_info=True)
        print(f"sparseformer {args.command}: error: {line}{_resume_hint(args)}", file=sys.stderr)
        return 1


def _runtime_error_line(exc: BaseException) -> str | None:
    """What a failure that is not a bug says, in one line: the memory ran out, a data-loading
    worker died, the processes of a run lost each other, input nested past Python's limit;
    ``None`` for any other (a bug of ours or torch's: traced)."""
    import torch  # imported already: every command runs after it

    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    # the CPU allocator's failure is a plain RuntimeError; CUDA's, torch.OutOfMemoryError
    if isinstance(exc, (MemoryError, torch.OutOfMemoryError)) or "can't allocate memory" in first:
        return (f"out of memory ({first[:200] or 'MemoryError'}); lower --batch-size or "
                "--img-size, or the size a checkpoint asks for")  # fmt: skip
    if isinstance(exc, RecursionError):  # a JSON nested thousands deep
        return f"the input nests too deeply to read ({first[:200]})"
    if _lost_a_peer(exc):  # under torchrun, another process ended: not a bug of ours
        return (f"the processes of the run lost each other ({first[:200]}): another one ended "
                "or was killed; its log says why")  # fmt: skip
    if first.startswith("DataLoader worker"):  # killed from outside (the out-of-memory killer)
        return (f"a data-loading worker died ({first}); the most common cause is memory: lower "
                "--workers or --batch-size")  # fmt: skip
    return None


def _lost_a_peer(exc: RuntimeError) -> bool:
    """Whether a collective failed because another process of the group went away (gloo
    raises a plain RuntimeError naming the closed connection; NCCL aborts its communicator).
    Told by torchrun's world size, not by the process group, which the command has destroyed
    on its way out by the time the error arrives here."""
    import torch.distributed as dist

    from sparseformer.engine.distributed import launched_rank

    if not dist.is_available() or launched_rank()[1] < 2:  # no torchrun group of several
        return False
    signs = ("Connection closed by peer", "Connection reset by peer", "NCCL communicator was")
    backend = getattr(dist, "DistBackendError", ())
    return isinstance(exc, backend) or any(s in str(exc) for s in signs)


# the commands that run one process per GPU under torchrun
DISTRIBUTED = ("train", "bootstrap")


def _resume_hint(args: argparse.Namespace) -> str:
    """How to continue a stopped ``train`` run, when it has a checkpoint to continue from."""
    output = getattr(args, "output", None) if args.command in ("train", "bootstrap") else None
    if output and not getattr(args, "overwrite", False) and (Path(output) / "last.pt").is_file():
        return "; to continue from the last checkpoint, run the same command with --resume auto"
    return ""
