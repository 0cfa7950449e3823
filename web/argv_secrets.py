"""Secrets given as flags are hidden from /proc/PID/cmdline at the very start of ``corral``.

Every user of the machine can read a process's command line, so ``--admin-token X`` was readable
for as long as the server took to import and set its title (~0.5 s). ``hide`` runs first thing
when the ``corral`` command's module is imported: ``setproctitle`` rewrites the memory the kernel
shows as the command line, with the values replaced by ``***``. The flag still works (``sys.argv``
keeps the value, inside the process); the log then recommends the ``_FILE`` form, which never
puts a secret on a command line.
"""

import sys

SECRET_FLAGS = ("--admin-token", "--database-url", "--metrics-token")
HIDDEN = "***"


def _secret_flag(arg: str) -> bool:
    """Whether ``arg`` names a secret flag (argparse accepts any unambiguous prefix of one)."""
    return len(arg) > 2 and any(flag.startswith(arg) for flag in SECRET_FLAGS)


def shown_argv(argv: list[str]) -> tuple[list[str], list[str]]:
    """``argv`` with the values of secret flags replaced, and the secret flags it held."""
    shown, found, hide_next = [], [], False
    for arg in argv:
        if hide_next:
            shown.append(HIDDEN)
            hide_next = False
            continue
        flag, eq, _ = arg.partition("=")
        if flag.startswith("--") and _secret_flag(flag):
            found.append(flag)
            hide_next = not eq
            arg = f"{flag}={HIDDEN}" if eq else arg
        shown.append(arg)
    return shown, found


def hide(argv: list[str] | None = None) -> list[str]:
    """Rewrite this process's command line without secret flags' values; return the flags that were there."""
    shown, found = shown_argv(sys.argv if argv is None else argv)
    if found:
        from setproctitle import setproctitle

        setproctitle(" ".join(shown))
    return found
