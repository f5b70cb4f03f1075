"""Identifier fields: the patterns an agent id, a request or task id, and a domain must match."""

from __future__ import annotations

from typing import Annotated

from pydantic import StringConstraints

AGENT_ID_PATTERN = r"^[a-z0-9][a-z0-9-]{0,62}$"
# Request and task ids travel in topic levels (computation/stream/<client>/<request>): no '/+#'.
TOKEN_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$"
DOMAIN_PATTERN = r"^[a-z][a-z0-9_-]{0,31}$"
# A model's name is a topic level (cms/slm/<model>/..., cms/configs/<model>/...); a version too.
MODEL_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
VERSION_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$"

AgentIdField = Annotated[str, StringConstraints(pattern=AGENT_ID_PATTERN)]
RequestIdField = Annotated[str, StringConstraints(pattern=TOKEN_ID_PATTERN)]
TaskIdField = Annotated[str, StringConstraints(pattern=TOKEN_ID_PATTERN)]
Domain = Annotated[str, StringConstraints(pattern=DOMAIN_PATTERN)]

# A site (one broker and its agents) is named like an agent: it is a topic level and a client id.
SiteIdField = Annotated[str, StringConstraints(pattern=AGENT_ID_PATTERN)]
