"""Who may call which route: the declared access policy of every route of the controller.

``tests/controller/test_role_matrix.py`` calls every route of ``create_app`` as nobody, as each
role and as an agent, and checks the answers against this table; a route that is not listed
here fails that test. So a new endpoint must be declared here with the roles it allows, and
the dependency it uses (``require_roles``, ``AnyUserDep``, ``AgentDep``) must agree.

Keys are ``(METHOD, path template)`` exactly as FastAPI registers them (mounts use ``"*"``).
"""

from __future__ import annotations

from typing import Final

from controller.models import Role

ANONYMOUS: Final = "anonymous"
AGENT: Final = "agent"

Access = frozenset[str]
"""The callers a route lets through: role names, ``"agent"`` and/or ``"anonymous"``."""


def roles(*allowed: Role) -> Access:
    """Users with one of ``allowed`` roles; admin always passes (as ``require_roles`` does)."""
    return frozenset({Role.ADMIN.value, *(r.value for r in allowed)})


ANY_USER: Final = frozenset(r.value for r in Role)
AGENT_ONLY: Final = frozenset({AGENT})
OPEN: Final = frozenset({ANONYMOUS, AGENT, *ANY_USER})
ADMIN: Final = roles()
OPERATORS: Final = roles(Role.OPERATOR)
FLOOR: Final = roles(Role.TECHNICIAN, Role.OPERATOR)
AUDITORS: Final = roles(Role.COMPLIANCE, Role.INSPECTOR)
EXPORTERS: Final = frozenset({Role.COMPLIANCE.value, Role.INSPECTOR.value})
"""Exports of the evidence: the compliance roles only, not even admin (issue 6)."""
PROPOSERS: Final = roles(Role.OPERATOR, Role.COMPLIANCE)
# Admin passes the role check, but controller.pool_policy refuses (403) anyone but a second,
# compliance-role user when the real decision is made.
DECIDERS: Final = roles(Role.COMPLIANCE)

API = "/api/v1"

ROUTE_ACCESS: Final[dict[tuple[str, str], Access]] = {
    # open: liveness, the API's own description, logging in, enrollment by one-time token
    ("GET", "/healthz"): OPEN,
    ("GET", "/openapi.json"): OPEN,
    ("GET", "/docs"): OPEN,
    ("GET", "/docs/oauth2-redirect"): OPEN,
    ("GET", "/redoc"): OPEN,
    ("POST", f"{API}/auth/token"): OPEN,
    ("POST", f"{API}/agents/enroll"): OPEN,
    # the caller's own account and tokens
    ("GET", f"{API}/users/me"): ANY_USER,
    ("GET", f"{API}/users/me/tokens"): ANY_USER,
    ("POST", f"{API}/users/me/tokens"): ANY_USER,
    ("DELETE", f"{API}/users/me/tokens/{{token_id}}"): ANY_USER,
    # user administration
    ("GET", f"{API}/users"): ADMIN,
    ("POST", f"{API}/users"): ADMIN,
    ("PATCH", f"{API}/users/{{name}}"): ADMIN,
    # sites and segments
    ("GET", f"{API}/sites"): ANY_USER,
    ("POST", f"{API}/sites"): OPERATORS,
    ("GET", f"{API}/sites/{{name}}"): ANY_USER,
    ("GET", f"{API}/sites/{{name}}/segments"): ANY_USER,
    ("POST", f"{API}/sites/{{name}}/segments"): OPERATORS,
    # agents
    ("POST", f"{API}/agents/enrollment-tokens"): OPERATORS,
    ("GET", f"{API}/agents"): ANY_USER,
    ("PATCH", f"{API}/agents/{{agent_id}}"): OPERATORS,
    # ingestion (agents only)
    ("POST", f"{API}/agent/reports"): AGENT_ONLY,
    # the register
    ("GET", f"{API}/machines"): ANY_USER,
    ("GET", f"{API}/machines/{{machine_id}}"): ANY_USER,
    ("POST", f"{API}/machines/{{machine_id}}/claim"): FLOOR,
    ("POST", f"{API}/machines/import-claims"): FLOOR,
    ("POST", f"{API}/machines/{{machine_id}}/state"): FLOOR,
    ("POST", f"{API}/machines/{{machine_id}}/confirm-serial"): FLOOR,
    # pool policy: pool sets (four eyes in the domain code), site policy, exemptions, bundles
    ("GET", f"{API}/agent/policy"): AGENT_ONLY,
    ("GET", f"{API}/sites/{{name}}/pool-sets"): ANY_USER,
    ("POST", f"{API}/sites/{{name}}/pool-sets"): PROPOSERS,
    ("POST", f"{API}/sites/{{name}}/pool-sets/{{version}}/approve"): DECIDERS,
    ("POST", f"{API}/sites/{{name}}/pool-sets/{{version}}/reject"): PROPOSERS,
    ("GET", f"{API}/sites/{{name}}/policy"): ANY_USER,
    ("PATCH", f"{API}/sites/{{name}}/policy"): OPERATORS,
    ("GET", f"{API}/sites/{{name}}/policy/preview"): ANY_USER,
    ("POST", f"{API}/machines/{{machine_id}}/exemptions"): PROPOSERS,
    ("POST", f"{API}/machines/{{machine_id}}/exemptions/{{exemption_id}}/approve"): DECIDERS,
    ("POST", f"{API}/machines/{{machine_id}}/exemptions/{{exemption_id}}/revoke"): PROPOSERS,
    ("GET", f"{API}/exemptions"): ANY_USER,
    # compliance evidence and alerts (read-only)
    ("GET", f"{API}/compliance/status"): ANY_USER,
    ("GET", f"{API}/machines/{{machine_id}}/compliance"): ANY_USER,
    ("POST", f"{API}/alerts/{{alert_id}}/resolve"): roles(Role.OPERATOR, Role.COMPLIANCE),
    ("GET", f"{API}/alerts"): ANY_USER,
    # the audit log
    ("GET", f"{API}/audit"): AUDITORS,
    ("GET", f"{API}/audit/verify"): AUDITORS,
    # compliance exports (background jobs, signed zips)
    ("POST", f"{API}/exports"): EXPORTERS,
    ("GET", f"{API}/exports"): EXPORTERS,
    ("GET", f"{API}/exports/{{job_id}}"): EXPORTERS,
    ("GET", f"{API}/exports/{{job_id}}/download"): EXPORTERS,
    # Prometheus
    ("GET", "/metrics"): ANY_USER,
}
