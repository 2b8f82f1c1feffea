"""A progress line with ETA for long steps; plain log lines when not on a terminal (CI logs)."""
import sys
import time


class Progress:
    """Call with the number of finished steps (and the total, when the caller knows it better);
    prints a bar on a TTY, else a few log lines."""

    def __init__(self, total: int, title: str, logger=None, every: float = 0.25):
        self.total, self.title, self.logger = max(int(total), 1), title, logger
        self.t0 = time.perf_counter()
        self.tty = sys.stderr.isatty()
        self.next_log = every
        self.every = every

    def __call__(self, done: int, total: int = None):
        if total is not None:
            self.total = max(int(total), 1)
        frac = done / self.total
        elapsed = time.perf_counter() - self.t0
        eta = elapsed / frac * (1 - frac) if frac > 0 else float('nan')
        msg = f'{self.title}: {done}/{self.total} [{elapsed:.0f}s<{eta:.0f}s]'
        if self.tty:
            bar = '#' * int(30 * frac)
            sys.stderr.write(f'\r{msg} |{bar:<30s}|')
            sys.stderr.flush()
        elif frac >= self.next_log or done == self.total:
            self.next_log += self.every
            (self.logger.info if self.logger else print)(msg)

    def close(self):
        if self.tty:
            sys.stderr.write('\n')
