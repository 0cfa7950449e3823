"""The one reader of /proc/PID/stat (cgroupfs.py and procstats.py both need fields of it)."""

# Field numbers of proc(5) minus 3: the list starts after "pid (comm) ".
STATE, UTIME, STIME, CUTIME, CSTIME, NUM_THREADS, STARTTIME, RSS = 0, 11, 12, 13, 14, 17, 19, 21


def stat_fields(pid: int) -> list[bytes]:
    """The fields of /proc/PID/stat after the process name; OSError (FileNotFoundError, ...) if unreadable."""
    with open(f"/proc/{pid}/stat", "rb") as fh:
        raw = fh.read()
    return raw[raw.rfind(b")") + 2:].split()  # the name in parentheses may hold spaces and ")"
