"""The agent's proxies: outbound capture (15001), inbound HBONE (15008), inbound plaintext (15006)."""
