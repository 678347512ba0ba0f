"""Token rotation on the sensor (capability ``rotation``), sans network.

The server pushes ``Command(name="rotate_token", args={"token": ..., "not_after": ...,
"previous_not_after": ...})`` over the authenticated control channel. The agent hands it to
``apply_rotation``, which validates the token, writes it to ``token_file`` atomically
(temporary file + fsync + rename + directory fsync, mode 0600: a power cut leaves the old
or the new token, never a torn file) and reads it back. The transports re-read
``token_file`` before every connect and every POST, so the next request already uses the
new token; the current control connection stays open. The answer is a
``CommandResponse`` the agent sends back; its message never contains the token.

Without a ``token_file`` a rotated token would live only in memory and be lost on restart
(while the old one expires): the agent then does not announce ``rotation`` at all.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from pipeline.common.files import atomic_write_text
from pipeline.common.logs import token_hint
from pipeline.common.messages import Command, CommandResponse

log = logging.getLogger(__name__)

ROTATE_COMMAND = "rotate_token"
# Printable, no whitespace (it goes into an Authorization header and a one-line file).
TOKEN_RE = re.compile(r"^[A-Za-z0-9._~+/=:-]{16,512}$")


def apply_rotation(command: Command, token_file: str | None) -> CommandResponse:
    """Store the pushed token durably; the reply says whether the sensor switched."""
    def reply(success: bool, message: str) -> CommandResponse:
        return CommandResponse(command_id=command.command_id, success=success,
                               message=message)

    if not token_file:
        return reply(False, "no token_file configured: cannot keep a rotated token")
    token = command.args.get("token", "")
    if not isinstance(token, str) or not TOKEN_RE.fullmatch(token):
        log.warning("token_rotation_refused command_id=%s reason=bad_token",
                    command.command_id)
        return reply(False, "the pushed token is not a valid token")
    path = Path(token_file)
    try:
        atomic_write_text(path, token + "\n", mode=0o600)
        stored = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        log.error("token_rotation_failed command_id=%s path=%s error=%s", command.command_id,
                  path, exc.strerror or type(exc).__name__)
        return reply(False, f"cannot write token_file: {exc.strerror or type(exc).__name__}")
    if stored != token:
        return reply(False, "token_file did not read back as written")
    log.info("token_rotated command_id=%s new=%s previous_not_after=%s", command.command_id,
             token_hint(token), str(command.args.get("previous_not_after", ""))[:40] or "-")
    return reply(True, "token rotated")
