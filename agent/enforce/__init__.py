"""Pool enforcement: a pure decision per miner (:mod:`.decide`) and the executor that writes,
reads back and reports (:mod:`.executor`)."""

from agent.enforce.decide import MinerView, decide
from agent.enforce.executor import EnforcementResult, Enforcer, EnforcerSettings

__all__ = ["EnforcementResult", "Enforcer", "EnforcerSettings", "MinerView", "decide"]
