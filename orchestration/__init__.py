"""AI task orchestration: scheduler, workers, result verification and slashing."""
