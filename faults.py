"""How the scripts meet bad input and faults: a user's mistake is one line on stderr and
exit code 2, never a traceback; two runs never share an output folder; Ctrl-C or SIGTERM
keeps what was learned. Nothing here knows about models or data.

    UserError, DataError, NonFiniteLoss    what a script reports in one line
    reported_in_one_line        around a script's work: those errors as one line, exit 2
    OneLineErrorParser, positive_int, ...    argparse that reports a bad flag in one line
    take_out_dir                the --out-dir lock
    StopRequest                 what a signal asks of the training loop
"""
import argparse
import atexit
import math
import os
import signal
import sys
import tempfile
from contextlib import contextmanager

import torch


class UserError(Exception):
    """What the user can fix: a flag that does not fit, a device this machine lacks, an
    --out-dir in use, a full disk. Reported in one line, exit 2."""


class DataError(UserError):
    """Bad user data (a missing path, an empty folder, an unreadable checkpoint)."""


class NonFiniteLoss(Exception):
    """The loss, the gradient norm or the weights stopped being finite numbers."""


@contextmanager
def writing(path):
    """Around the writing of `path`: an OSError (a full disk, a folder gone) becomes a
    one-line UserError that names the file and the cause ("No space left on device")."""
    try:
        yield
    except OSError as error:
        raise UserError(f"could not write {path} ({error.strerror or error})") from None


def fail(script, message):
    """The one way a script stops on a user's mistake: one line on stderr, exit 2."""
    print(f"{script}: error: {message}", file=sys.stderr)
    sys.exit(2)


@contextmanager
def reported_in_one_line(script):
    """Around a script's work: a UserError or NonFiniteLoss ends it through `fail`."""
    try:
        yield
    except (UserError, NonFiniteLoss) as error:
        fail(script, user_message(error))


def user_message(error):
    """A DataError raised in a loader worker reaches the main process wrapped in the
    worker's traceback: keep its own message."""
    last_line = str(error).strip().splitlines()[-1] if str(error).strip() else repr(error)
    for name in ("DataError", "UserError"):
        last_line = last_line.removeprefix(f"faults.{name}: ").removeprefix(f"{name}: ")
    return last_line


# ----------------------------------------------------------------------------------- flags

class OneLineErrorParser(argparse.ArgumentParser):
    """argparse that reports a bad flag in one line (no usage dump) and exits with 2."""

    def error(self, message):
        fail(self.prog, message)


def positive_int(text):
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def non_negative_int(text):
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text}")
    return value


def seed(text):
    """A seed every generator takes (numpy's legacy seed is below 2**32; the rank and the
    step are appended to it as digits for torch's, which must stay below 2**64)."""
    value = int(text)
    if not 0 <= value < 2**32:
        raise argparse.ArgumentTypeError(f"must be an integer in [0, 2**32), got {text}")
    return value


def one_character(text):
    """A CSV separator: Python's csv module takes one character."""
    text = {"\\t": "\t", "tab": "\t"}.get(text, text)
    if len(text) != 1:
        raise argparse.ArgumentTypeError(f"must be one character, got {text!r}")
    return text


def below_one(text):
    value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def non_negative_float(text):
    value = float(text)
    if not 0 <= value < math.inf:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def positive_float(text):
    value = float(text)
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def fraction(text):
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text}")
    return value


def device_name(text):
    """A device this machine has: cpu, cuda or cuda:N."""
    try:
        device_type = torch.device(text).type
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"not a device (cpu, cuda, cuda:N), got {text}")
    if device_type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"must be cpu or cuda, got {text}")
    if device_type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"this machine has no CUDA device, got {text}")
    return text


# ------------------------------------------------------------------------- the out-dir lock

def take_out_dir(out_dir):
    """A lock file with our pid: two live runs never share an --out-dir (and its
    checkpoint). The lock appears with the pid already in it (a hard link to a file
    written first), so two runs started at the same instant cannot both see it empty;
    one left by a process that is gone, or whose pid now runs something other than
    train.py, is taken over. -> the function that removes it, registered at exit too."""
    check_writable(out_dir)
    lock = os.path.join(out_dir, "train.lock")
    mine = f"{lock}.{os.getpid()}"
    with open(mine, "w") as f:
        f.write(str(os.getpid()))
    try:
        for _ in range(2):
            try:
                link_or_create(mine, lock)
            except FileExistsError:
                owner = lock_owner(lock)
                if owner is not None:
                    raise UserError(f"--out-dir {out_dir} is in use by a running train.py (pid "
                                    f"{owner}); pick another --out-dir") from None
                os.remove(lock)
                continue

            def release():
                if lock_owner(lock, own=True):
                    os.remove(lock)
            atexit.register(release)
            return release
        raise UserError(f"--out-dir {out_dir}: could not take {lock}; try again")
    finally:
        os.remove(mine)


def link_or_create(source, path):
    """`path` as a hard link to `source`, or FileExistsError. Where the file system has no
    hard links, `path` is created exclusively and `source`'s text written into it."""
    try:
        os.link(source, path)
    except FileExistsError:
        raise
    except OSError:
        descriptor = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        with os.fdopen(descriptor, "w") as f, open(source) as text:
            f.write(text.read())


def check_writable(directory):
    try:
        os.makedirs(directory, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory):
            pass
    except OSError as error:
        raise UserError(f"--out-dir {directory} is not writable: "
                        f"{error.strerror or error}") from None


def lock_owner(lock, own=False):
    """The pid in `lock` if a train.py other than this process runs under it (with `own`,
    if it is this process), else None: a lock that is unreadable, empty or names a process
    that is gone or that runs something else does not hold the folder."""
    try:
        with open(lock) as f:
            pid = int(f.read().strip())
    except (ValueError, OSError):
        return None
    if own:
        return pid if pid == os.getpid() else None
    if pid == os.getpid() or not process_runs_train(pid):
        return None
    return pid


def process_runs_train(pid):
    """Whether `pid` is a live process running train.py (where /proc can tell; a live
    process otherwise)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, another user's
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"train.py" in f.read()
    except OSError:
        return not os.path.isdir("/proc")


# ---------------------------------------------------------------------------------- signals

class StopRequested(Exception):
    """Raised by the signal handler while the loop waits for data: nothing is half done."""


class StopRequest:
    """Ctrl-C or SIGTERM, as the training loop sees it. The loop says what it is doing in
    `phase`: "training" (in a step: finish it, save, exit), "waiting" (for data, which may
    never come: StopRequested is raised there, to save now and exit), "starting" or
    "evaluating" (nothing to save: exit at once). A second signal exits at once."""

    def __init__(self, on_exit=None):
        self.signal = None  # the signal number once one came
        self.phase = "starting"
        self.on_exit = on_exit  # what an exit at once must still do (release the lock)

    def install(self):
        signal.signal(signal.SIGINT, self.handle)
        signal.signal(signal.SIGTERM, self.handle)

    @contextmanager
    def waiting(self):
        """Around the wait for a batch: a signal here raises StopRequested at once (the data
        may never come); after it, the loop is in a step, which a signal lets finish."""
        self.phase = "waiting"
        yield
        self.phase = "training"

    def handle(self, signum, frame):
        if self.signal is not None or self.phase in ("evaluating", "starting"):
            # os._exit: a SystemExit raised wherever the signal landed could wait on a lock
            print(f"\nstopped by signal {signum} while {self.phase}", file=sys.stderr,
                  flush=True)
            if self.on_exit:
                self.on_exit()  # os._exit runs no atexit handler
            os._exit(128 + signum)
        self.signal = signum
        if self.phase == "waiting":
            raise StopRequested

    def exit(self):
        sys.exit(128 + (self.signal or signal.SIGTERM))
