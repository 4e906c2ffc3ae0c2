FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY worker ./worker
COPY tasks ./tasks
COPY storage ./storage
COPY emulator ./emulator
RUN pip install --no-cache-dir '.[flower]' && useradd --create-home poller
USER poller
ENTRYPOINT ["hipchat-poller"]
CMD ["worker"]
