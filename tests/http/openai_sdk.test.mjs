// kvserve's OpenAI-compatible HTTP API driven by clients nobody here wrote: the official `openai`
// npm package, curl and Python's standard library. Starts a real `kvserve serve` (the binary in
// $KVSERVE_BIN, the test model as the server finds it) with an API key and a one-stream limit, and
// stops it with SIGTERM at the end. Run by CTest (tests/http/run.sh).
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, execFileSync } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import path from 'node:path';
import OpenAI from 'openai';

const here = path.dirname(fileURLToPath(import.meta.url));
const apiKey = 'test-key-' + process.pid;
let server;
let serverLog = '';
let baseURL;
let httpPort;
let client;
let modelId;

function startServer() {
  const binary = process.env.KVSERVE_BIN;
  assert.ok(binary, 'set KVSERVE_BIN to the kvserve binary');
  server = spawn(binary, ['serve', '--host', '127.0.0.1', '--port', '0', '--metrics-port', '0',
    '--max-concurrent-streams', '1', '--api-key', apiKey], { stdio: ['ignore', 'pipe', 'pipe'] });
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error('no SERVING line within 60 s:\n' + serverLog)), 60000);
    const onData = (data) => {
      serverLog += data.toString();
      const port = serverLog.match(/metrics on http:\/\/127\.0\.0\.1:(\d+)\/metrics/);
      if (port && serverLog.includes('SERVING:')) {
        clearTimeout(timer);
        resolve(Number(port[1]));
      }
    };
    server.stdout.on('data', onData);
    server.stderr.on('data', onData);
    server.on('exit', (code) => reject(new Error(`kvserve exited with ${code}:\n${serverLog}`)));
  });
}

async function metric(name) {
  const text = await (await fetch(`http://127.0.0.1:${httpPort}/metrics`)).text();
  const line = text.split('\n').find((l) => l.startsWith(name + ' '));
  assert.ok(line, `no ${name} in /metrics`);
  return Number(line.split(' ')[1]);
}

// Waits (up to 20 s) until the engine holds no sequence and no KV block.
async function waitUntilIdle() {
  const deadline = Date.now() + 20000;
  while ((await metric('kvserve_kv_blocks_used')) !== 0 || (await metric('kvserve_requests_running')) !== 0) {
    assert.ok(Date.now() < deadline, 'the blocks of an abandoned stream never returned to the pool');
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
}

before(async () => {
  httpPort = await startServer();
  baseURL = `http://127.0.0.1:${httpPort}/v1`;
  client = new OpenAI({ apiKey, baseURL, maxRetries: 0, timeout: 60000 });
  modelId = (await client.models.list()).data[0].id;
});

after(async () => {
  if (!server || server.exitCode !== null) return;
  const exited = new Promise((resolve) => server.on('exit', (code) => resolve(code)));
  server.kill('SIGTERM');
  assert.equal(await exited, 0, 'SIGTERM drains and exits 0:\n' + serverLog);
});

test('models.list names the served model and its KV format', async () => {
  const models = await client.models.list();
  assert.equal(models.data.length, 1);
  assert.equal(models.data[0].object, 'model');
  assert.equal(models.data[0].id, 'gpt2-tiny-docs');
  assert.equal(models.data[0].kvserve.kv_format, 'kivi2');
  assert.equal(models.data[0].kvserve.kv_bits, 2);
});

test('a non-streamed completion has text, finish_reason length and usage', async () => {
  const completion = await client.completions.create({
    model: modelId, prompt: 'The cache', max_tokens: 12, temperature: 0, ignore_eos: true,
  });
  assert.equal(completion.object, 'text_completion');
  assert.equal(completion.choices.length, 1);
  assert.equal(completion.choices[0].finish_reason, 'length');
  assert.ok(completion.choices[0].text.length > 0);
  assert.equal(completion.usage.completion_tokens, 12);
  assert.equal(completion.usage.prompt_tokens, 2);  // "The", " cache"
  assert.equal(completion.usage.total_tokens, 14);
});

test('a streamed greedy completion equals the non-streamed one, usage in a last chunk', async () => {
  const request = { model: modelId, prompt: [464, 12940], max_tokens: 20, temperature: 0, ignore_eos: true };
  const whole = await client.completions.create(request);
  const stream = await client.completions.create({ ...request, stream: true, stream_options: { include_usage: true } });
  let text = '';
  const finishReasons = [];
  let usage = null;
  let chunks = 0;
  for await (const chunk of stream) {
    ++chunks;
    if (chunk.usage) {
      assert.equal(chunk.choices.length, 0, 'the usage chunk has no choices');
      usage = chunk.usage;
      continue;
    }
    assert.equal(chunk.usage, null, 'other chunks carry usage: null');
    text += chunk.choices[0].text;
    if (chunk.choices[0].finish_reason) finishReasons.push(chunk.choices[0].finish_reason);
  }
  assert.ok(chunks > 2);
  assert.equal(text, whole.choices[0].text);
  assert.deepEqual(finishReasons, ['length']);
  assert.deepEqual(usage, whole.usage);
});

test('stop strings end the completion with finish_reason stop and are not returned', async () => {
  const free = await client.completions.create({ model: modelId, prompt: 'The cache', max_tokens: 30, temperature: 0, ignore_eos: true });
  const text = free.choices[0].text;
  const stop = text.slice(4, 6);
  assert.ok(stop.length === 2);
  const stopped = await client.completions.create({ model: modelId, prompt: 'The cache', max_tokens: 30, temperature: 0, ignore_eos: true, stop: [stop] });
  assert.equal(stopped.choices[0].finish_reason, 'stop');
  assert.equal(stopped.choices[0].text, text.slice(0, text.indexOf(stop)));
});

test('logprobs: 0 returns one log-probability per token', async () => {
  const completion = await client.completions.create({ model: modelId, prompt: 'The cache', max_tokens: 5, temperature: 0, ignore_eos: true, logprobs: 0 });
  const logprobs = completion.choices[0].logprobs;
  assert.equal(logprobs.tokens.length, 5);
  assert.equal(logprobs.token_logprobs.length, 5);
  assert.equal(logprobs.tokens.join(''), completion.choices[0].text);
  for (const lp of logprobs.token_logprobs) assert.ok(lp <= 0 && lp > -100);
});

test('bad requests surface as the SDK error classes with OpenAI error bodies', async () => {
  const cases = [
    [{ model: modelId, prompt: 'x', n: 2 }, OpenAI.BadRequestError, 'n'],
    [{ model: modelId, prompt: 'x', echo: true }, OpenAI.BadRequestError, 'echo'],
    [{ model: modelId, prompt: 'x', temperature: -1 }, OpenAI.BadRequestError, null],
    [{ model: modelId, prompt: 'x', max_tokens: 100000 }, OpenAI.BadRequestError, null],
    [{ model: modelId, prompt: '' }, OpenAI.BadRequestError, null],
    [{ model: modelId, prompt: 'x', logprobs: 3 }, OpenAI.BadRequestError, 'logprobs'],
    [{ model: 'gpt-4', prompt: 'x' }, OpenAI.NotFoundError, 'model'],
  ];
  for (const [request, errorClass, param] of cases) {
    await assert.rejects(client.completions.create(request), (error) => {
      assert.ok(error instanceof errorClass, `${JSON.stringify(request)} -> ${error.constructor.name}: ${error.message}`);
      assert.equal(error.error.param, param);
      assert.equal(typeof error.error.message, 'string');
      assert.ok(error.error.message.length > 0);
      return true;
    });
  }
});

test('chat completions answer 404 saying GPT-2 has no chat template', async () => {
  await assert.rejects(
    client.chat.completions.create({ model: modelId, messages: [{ role: 'user', content: 'hi' }] }),
    (error) => error instanceof OpenAI.NotFoundError && /chat template/.test(error.message));
});

test('a wrong or missing API key is an AuthenticationError; health and metrics stay open', async () => {
  const other = new OpenAI({ apiKey: 'wrong-key', baseURL, maxRetries: 0 });
  await assert.rejects(other.completions.create({ model: modelId, prompt: 'x' }),
    (error) => error instanceof OpenAI.AuthenticationError && error.code === 'invalid_api_key');
  const noKey = await fetch(`${baseURL}/completions`, { method: 'POST', body: JSON.stringify({ model: modelId, prompt: 'x' }) });
  assert.equal(noKey.status, 401);
  assert.equal((await noKey.json()).error.code, 'invalid_api_key');
  assert.equal((await fetch(`http://127.0.0.1:${httpPort}/health`)).status, 200);
  assert.equal((await fetch(`http://127.0.0.1:${httpPort}/metrics`)).status, 200);
});

test('beyond --max-concurrent-streams a completion is a RateLimitError (429)', async () => {
  const controller = new AbortController();
  const first = await client.completions.create(
    { model: modelId, prompt: 'x', max_tokens: 1000, ignore_eos: true, stream: true },
    { signal: controller.signal });
  const iterator = first[Symbol.asyncIterator]();
  await iterator.next();  // the first stream is open in the engine
  await assert.rejects(client.completions.create({ model: modelId, prompt: 'x', max_tokens: 1 }),
    (error) => error instanceof OpenAI.RateLimitError);
  controller.abort();
  await waitUntilIdle();
  // Free again: the next request goes through.
  const after = await client.completions.create({ model: modelId, prompt: 'x', max_tokens: 1 });
  assert.equal(after.usage.completion_tokens, 1);
});

test('a client that disconnects mid-stream cancels its request and frees its KV blocks', async () => {
  const cancelled = 'kvserve_request_failure_total{code="CANCELLED"}';
  const cancelledBefore = await metric(cancelled);
  const tokensBefore = await metric('kvserve_generation_tokens_total');
  const controller = new AbortController();
  const stream = await client.completions.create(
    { model: modelId, prompt: 'The cache', max_tokens: 1000, ignore_eos: true, stream: true },
    { signal: controller.signal });
  let chunks = 0;
  for await (const chunk of stream) {
    assert.equal(chunk.object, 'text_completion');
    if (++chunks === 3) {
      controller.abort();
      break;
    }
  }
  await waitUntilIdle();
  assert.equal(await metric(cancelled), cancelledBefore + 1, 'the server cancelled the request');
  assert.ok((await metric('kvserve_generation_tokens_total')) - tokensBefore < 1000);
});

test('curl -N sees OpenAI SSE framing: data lines, a usage chunk, then [DONE]', () => {
  const body = JSON.stringify({ model: modelId, prompt: 'The cache', max_tokens: 6, temperature: 0,
    ignore_eos: true, stream: true, stream_options: { include_usage: true } });
  const out = execFileSync('curl', ['-sN', '--fail-with-body', '-H', `Authorization: Bearer ${apiKey}`,
    '-H', 'Content-Type: application/json', '-d', body, '-D', '-', `${baseURL}/completions`]).toString();
  const [head, events] = out.split('\r\n\r\n', 2);
  assert.match(head, /^HTTP\/1\.1 200/);
  assert.match(head, /content-type: text\/event-stream/i);
  assert.match(events, /^(data: [^\n]+\n\n)+data: \[DONE\]\n\n$/);
  const frames = events.trim().split('\n\n').map((f) => f.slice('data: '.length));
  assert.equal(frames.pop(), '[DONE]');
  const parsed = frames.map((f) => JSON.parse(f));
  assert.deepEqual(parsed.at(-1).usage, { prompt_tokens: 2, completion_tokens: 6, total_tokens: 8 });
  assert.equal(parsed.at(-2).choices[0].finish_reason, 'length');
});

test("Python's urllib reads /health and /v1/models", () => {
  const out = execFileSync('python3', [path.join(here, 'check_endpoints.py'), String(httpPort), apiKey]).toString();
  assert.match(out, /ok/);
});
