"""Evaluation of a policy on LoCoMo: the eval job and the LLM judge."""
