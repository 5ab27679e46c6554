"""agent.secrets: sealed secrets (pure).

- `agent.secrets.sealed`: parse, verify (ES256 against a P-256 JWK the caller fetches), read without
  verification (insecure mode), and create `sealed.<header>.<payload>.<signature>` secrets.

    from agent.secrets import sealed

    secret = sealed.parse(text)
    payload = sealed.verify(secret, jwk_bytes)   # VaultSecret | EnvelopeSecret
"""

__all__: list[str] = []
