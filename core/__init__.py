"""The service core that the API and the workers share: settings, the job store and its migrations, the one
job check, tenants, routing and enqueueing, studies (torch-free)."""
