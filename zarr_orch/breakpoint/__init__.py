"""The breakpoint as named steps: prepare products, plan tiles, run rounds, serve, book.

`zarr_orch.orchestrator.Orchestrator.compute_futures` calls them in that order; each step
module is readable and testable alone and never imports the facade.
"""
