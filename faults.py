"""How the scripts meet bad input and faults: a user's mistake is one line on stderr and
exit code 2, never a traceback; two runs never share an output folder; Ctrl-C or SIGTERM
keeps what was learned. Nothing here knows about models or data.

    DataError, NonFiniteLoss    the two faults a script reports in one line
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

import torch


class DataError(Exception):
    """Bad user data (a missing path, an empty folder, an unreadable checkpoint):
    reported in one line, exit 2."""


class NonFiniteLoss(Exception):
    """The loss, the gradient norm or the weights stopped being finite numbers."""


def fail(script, message):
    print(f"{script}: error: {message}", file=sys.stderr)
    sys.exit(2)


def user_message(error):
    """A DataError raised in a loader worker reaches the main process wrapped in the
    worker's traceback: keep its own message."""
    last_line = str(error).strip().splitlines()[-1] if str(error).strip() else repr(error)
    return last_line.removeprefix("faults.DataError: ").removeprefix("DataError: ")


# ----------------------------------------------------------------------------------- flags

class OneLineErrorParser(argparse.ArgumentParser):
    """argparse that reports a bad flag in one line (no usage dump) and exits with 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


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
    checkpoint). A lock left by a dead process is taken over; ours goes at exit."""
    check_writable(out_dir)
    lock = os.path.join(out_dir, "train.lock")
    for _ in range(2):
        try:
            descriptor = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            if process_alive(lock):
                with open(lock) as f:
                    owner = f.read().strip()
                raise DataError(f"--out-dir {out_dir} is in use by a running train.py (pid "
                                f"{owner}); pick another --out-dir")
            os.remove(lock)
            continue
        with os.fdopen(descriptor, "w") as f:
            f.write(str(os.getpid()))
        atexit.register(lambda: os.path.exists(lock) and os.remove(lock))
        return


def check_writable(directory):
    try:
        os.makedirs(directory, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory):
            pass
    except OSError as error:
        raise DataError(f"--out-dir {directory} is not writable: "
                        f"{error.strerror or error}") from None


def process_alive(lock):
    try:
        with open(lock) as f:
            pid = int(f.read().strip())
        os.kill(pid, 0)
    except (ValueError, OSError):
        return False
    return pid != os.getpid()


# ---------------------------------------------------------------------------------- signals

class StopRequested(Exception):
    """Raised by the signal handler while the loop waits for data: nothing is half done."""


class StopRequest:
    """Ctrl-C or SIGTERM, as the training loop sees it. The loop says what it is doing in
    `phase`: "training" (in a step: finish it, save, exit), "waiting" (for data, which may
    never come: StopRequested is raised there, to save now and exit), "starting" or
    "evaluating" (nothing to save: exit at once). A second signal exits at once."""

    def __init__(self):
        self.signal = None  # the signal number once one came
        self.phase = "starting"

    def install(self):
        signal.signal(signal.SIGINT, self.handle)
        signal.signal(signal.SIGTERM, self.handle)

    def handle(self, signum, frame):
        if self.signal is not None or self.phase in ("evaluating", "starting"):
            # os._exit: a SystemExit raised wherever the signal landed could wait on a lock
            print(f"\nstopped by signal {signum} while {self.phase}", file=sys.stderr,
                  flush=True)
            os._exit(128 + signum)
        self.signal = signum
        if self.phase == "waiting":
            raise StopRequested

    def exit(self):
        sys.exit(128 + (self.signal or signal.SIGTERM))
