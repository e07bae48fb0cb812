"""The backend contract as a test suite, shipped with the package (in the spirit of Gymnasium's
`check_env`): every check of `Kernel`'s contract, `run_program` and grading included, runs
against any backend, registered by name or given as a class.

    from sandbox_env.testing import check_backend
    report = check_backend("fake")          # raises ContractError listing what failed
    print(report)                           # passed / failed / skipped, with reasons

Checks that need a capability the backend does not declare (`Kernel.capabilities`, see
`sandbox_env.kernels.base.CAPABILITIES`) are skipped, saying which and why. For pytest, iterate
over `CHECKS` and call `run_check` (docs/testing.md has the ten lines).
"""

from sandbox_env.testing import checks, program_checks  # noqa: F401 - registers the checks, in order
from sandbox_env.testing.suite import (
    CHECKS,
    Check,
    CheckSkipped,
    ContractError,
    Harness,
    Outcome,
    Report,
    check,
    check_backend,
    check_backend_async,
    register,
    run_check,
    small_policy,
)

__all__ = ["CHECKS", "Check", "CheckSkipped", "ContractError", "Harness", "Outcome", "Report", "check",
           "check_backend", "check_backend_async", "register", "run_check", "small_policy"]
