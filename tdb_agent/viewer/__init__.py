"""The viewer: web pages where people look at the model, its components, prompts, circuits
and agent runs (`tdb-agent view RUN_DIR`, or `/` of `tdb-agent serve --transport http`).

`api` is a small JSON API over the same `ops` functions and pydantic models the MCP tools
return; `routes` wires it into the MCP server's HTTP app; `static/` holds the page (plain
HTML, CSS and JavaScript that draws with the browser's own SVG and canvas; no build step).
"""
