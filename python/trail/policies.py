"""The one table of scheduling policies (imports nothing, so the CLI can build its parser without
torch). Their parameters and per-policy defaults are in `trail.scheduler_types`."""
POLICIES = ("fcfs", "sjf_prompt", "trail", "oracle")
