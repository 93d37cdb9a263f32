"""The LLM reasoning stage: prompts (prompts.py), output schema and parsing (schema.py), the chat client
(llm.py), the reranker (reranker.py), the bundled local model server (local_server.py), and the
safety pieces around them (breaker.py, copy_validator.py)."""
