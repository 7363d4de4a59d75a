"""Log lines in logfmt (the Prometheus exporters' default) or JSON, on stderr."""

from __future__ import annotations

import json
import logging
import sys
import time

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warn": logging.WARNING, "error": logging.ERROR}


def _quote(value: str) -> str:
    if value and all(c.isalnum() or c in "-_./:@" for c in value):
        return value
    return json.dumps(value)


class LogfmtFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"
        level = {"WARNING": "warn"}.get(record.levelname, record.levelname.lower())
        line = f"ts={ts} level={level} source={_quote(record.name)} msg={_quote(record.getMessage())}"
        if record.exc_info:
            line += f" err={_quote(self.formatException(record.exc_info))}"
        return line


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": {"WARNING": "warn"}.get(record.levelname, record.levelname.lower()),
            "source": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            doc["err"] = self.formatException(record.exc_info)
        return json.dumps(doc)


def setup(level: str = "info", fmt: str = "logfmt") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else LogfmtFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(_LEVELS.get(level, logging.INFO))
    # Libraries are chatty at info; their warnings still come through.
    for name in ("aiohttp.access", "asyncio"):
        logging.getLogger(name).setLevel(logging.DEBUG if level == "debug" else logging.WARNING)


_warned: dict[str, None] = {}
_WARNED_MAX = 4096


def warn_once(logger: logging.Logger, key: str, msg: str, *args: object) -> None:
    """Warn about ``key`` the first time only; later repeats go to debug.

    The same odd path is met again on every scan round: a quiet exporter says so once, not every
    fifteen minutes for months.
    """
    if key in _warned:
        logger.debug(msg, *args)
        return
    if len(_warned) >= _WARNED_MAX:
        _warned.pop(next(iter(_warned)))
    _warned[key] = None
    logger.warning(msg, *args)
