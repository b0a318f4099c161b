"""mvp-auth: API keys, CORS, usage metering and limits in front of the bridge."""
