# One image for every lockgate service; the command picks the service (`lockgate serve <name>`).
FROM python:3.11-slim AS server
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 UV_COMPILE_BYTECODE=1
WORKDIR /app
RUN pip install --no-cache-dir "uv>=0.5"
COPY pyproject.toml uv.lock README.md ./
COPY shared ./shared
COPY services ./services
COPY dev ./dev
# lockgate[server] only: no dev tooling, no test dependencies.
RUN uv sync --frozen --no-default-groups --extra server
ENV PATH="/app/.venv/bin:$PATH"
EXPOSE 8080 50051
ENTRYPOINT ["lockgate"]
CMD ["--help"]

# The simulated upstream and the demo (`lockgate sim`, `lockgate demo`), for compose's demo only.
FROM server AS dev
RUN uv sync --frozen --no-default-groups --extra server --package lockgate-dev --inexact
