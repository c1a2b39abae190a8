"""Engines: FSDP2/DTensor helpers, the merged-policy export (one merge of θ+w for the export, vLLM and the KL reference) and the vLLM weight sync."""
