"""The protocol-free service layer between the tools' wiring (MCP in `server`, JSON routes
in `viewer`) and the numbers (`ops`, `datasets`, `explain`): per-call limits, how a tool
body runs (engine lock, errors a model can read, out-of-memory recovery), and results both
front ends share. Neither `server` nor `viewer` imports the other; both import this."""
