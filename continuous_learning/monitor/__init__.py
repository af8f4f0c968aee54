"""Watching the loop from the logs and the registry: `cl status` (`status`), the HTML/Markdown report, data and
concept drift, A/B tests (including the arm a chat session is served from) and champion health. Reads what the
other stages wrote; stands on core, storage and registry only."""
