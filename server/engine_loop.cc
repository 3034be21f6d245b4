#include "server/engine_loop.h"

#include <pthread.h>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <stdexcept>
#include <thread>

namespace kvserve {
namespace {

// The throughput gauge averages over this window.
constexpr auto kThroughputWindow = std::chrono::seconds(5);

double seconds_between(Clock::time_point from, Clock::time_point to) {
  return std::chrono::duration<double>(to - from).count();
}

}  // namespace

EngineLoop::Active::Active(const Tokenizer& tokenizer, Ticket ticket, ServeRequest request,
                           std::shared_ptr<StreamChannel> channel)
    : ticket(ticket),
      request(std::move(request)),
      channel(std::move(channel)),
      text(tokenizer, this->request.stop) {}

EngineLoop::EngineLoop(std::unique_ptr<Engine> engine, Tokenizer tokenizer,
                       EngineLoopOptions options, Metrics& metrics)
    : engine_(std::move(engine)),
      tokenizer_(std::move(tokenizer)),
      options_(options),
      metrics_(metrics) {}

EngineLoop::~EngineLoop() {
  stop();
}

void EngineLoop::start() {
  thread_ = std::thread([this] { run(); });
}

void EngineLoop::wait_until_warm() {
  std::unique_lock<std::mutex> lock(mu_);
  warm_cv_.wait(lock, [this] { return warm_; });
  if (!warm_error_.empty()) throw std::runtime_error("warm-up failed: " + warm_error_);
}

void EngineLoop::stop() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  wake_.notify_one();
  if (thread_.joinable()) thread_.join();
}

EngineLoop::SubmitResult EngineLoop::submit(ServeRequest request,
                                            std::shared_ptr<StreamChannel> channel,
                                            Ticket& ticket) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (!device_lost_.empty()) return SubmitResult::kDeviceLost;
    if (inbox_.size() + queued_in_engine_ >= options_.max_queued_requests) {
      return SubmitResult::kQueueFull;
    }
    ticket = next_ticket_++;
    inbox_.push_back(Submission{ticket, std::move(request), std::move(channel)});
    ++in_flight_;
  }
  wake_.notify_one();
  return SubmitResult::kAccepted;
}

void EngineLoop::cancel(Ticket ticket, bool deadline) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    inbox_.push_back(Cancellation{ticket, deadline});
  }
  wake_.notify_one();
}

void EngineLoop::cancel_all() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    inbox_.push_back(CancelAll{});
  }
  wake_.notify_one();
}

EngineSnapshot EngineLoop::snapshot() const {
  std::lock_guard<std::mutex> lock(mu_);
  return snapshot_;
}

std::string EngineLoop::device_lost() const {
  std::lock_guard<std::mutex> lock(mu_);
  return device_lost_;
}

void EngineLoop::run() {
  // For `top -H`, perf and kvserve_host_bench, which times this thread's CPU by its name.
  pthread_setname_np(pthread_self(), kEngineThreadName);
  try {
    warm_up();
  } catch (const std::exception& e) {
    std::lock_guard<std::mutex> lock(mu_);
    warm_error_ = e.what();
    warm_ = true;
    warm_cv_.notify_all();
    return;
  }
  publish_snapshot();
  {
    std::lock_guard<std::mutex> lock(mu_);
    warm_ = true;
  }
  warm_cv_.notify_all();

  std::deque<InboxItem> items;
  while (true) {
    {
      std::unique_lock<std::mutex> lock(mu_);
      if (inbox_.empty() && !engine_->has_work()) {
        const auto ready = [this] { return stop_ || !inbox_.empty(); };
        if (recent_tokens_.empty()) {
          wake_.wait(lock, ready);
        } else {  // wake once the throughput window moves, so the gauge decays to 0 when idle
          wake_.wait_until(lock, recent_tokens_.front().first + kThroughputWindow, ready);
        }
      }
      if (stop_) break;
      items.swap(inbox_);
      // The submissions leave the inbox now and join the engine's queue below; count them there
      // until the next snapshot, so the queue limit has no blind spot.
      for (const InboxItem& item : items) {
        if (std::holds_alternative<Submission>(item)) ++queued_in_engine_;
      }
    }
    process_inbox(items);
    items.clear();
    expire_deadlines(Clock::now());
    if (engine_->has_work()) step();
    // This pass's messages go out together, before the thread pauses, sleeps or steps again.
    pokes_.deliver();
    if (!engine_->device_lost().empty()) {
      fail_inbox_after_device_lost();
      return;
    }
    if (options_.pause_after_step.count() > 0)
      std::this_thread::sleep_for(options_.pause_after_step);
    update_throughput(Clock::now());
  }
}

void EngineLoop::warm_up() {
  GenerationRequest request;
  request.prompt = {engine_->model().eos_token_id};
  request.max_new_tokens = 2;
  request.ignore_eos = true;
  request.sampling.temperature = 0.0f;
  engine_->add_request(request);
  while (engine_->has_work()) {
    events_.clear();
    engine_->step(events_);
    for (const StepEvent& event : events_) {
      if (event.finish == FinishReason::kError) throw std::runtime_error(event.error);
    }
  }
}

void EngineLoop::process_inbox(std::deque<InboxItem>& items) {
  for (InboxItem& item : items) {
    if (auto* submission = std::get_if<Submission>(&item)) {
      admit(*submission);
    } else if (const auto* cancellation = std::get_if<Cancellation>(&item)) {
      if (auto it = by_ticket_.find(cancellation->ticket); it != by_ticket_.end()) {
        end_in_engine(it->second, active_.at(it->second),
                      cancellation->deadline ? Cancelled::kDeadline : Cancelled::kClientGone);
      }
    } else {
      for (auto& [id, active] : active_) end_in_engine(id, active, Cancelled::kDrain);
    }
  }
}

void EngineLoop::admit(Submission& submission) {
  const absl::Status status = engine_->validate(submission.request.generation);
  if (!status.ok()) {
    const std::string problem(status.message());
    spdlog::warn("request {} rejected: INVALID_ARGUMENT: {}", submission.request.id, problem);
    metrics_.count_failure("INVALID_ARGUMENT");
    --in_flight_;
    submission.channel->push_error(StreamError::kInvalidArgument, problem, &pokes_);
    return;
  }
  const RequestId id = engine_->add_request(submission.request.generation);
  active_.emplace(id, Active(tokenizer_, submission.ticket, std::move(submission.request),
                             std::move(submission.channel)));
  by_ticket_[submission.ticket] = id;
}

// `why`: kNo for a matched stop string, which the request's TextStream reports.
void EngineLoop::end_in_engine(RequestId id, Active& active, Cancelled why) {
  if (active.ending) return;
  active.ending = true;
  active.cancelled = why;
  engine_->cancel(id);
}

void EngineLoop::expire_deadlines(Clock::time_point now) {
  for (auto& [id, active] : active_) {
    if (active.request.deadline && now >= *active.request.deadline) {
      end_in_engine(id, active, Cancelled::kDeadline);
    }
  }
}

void EngineLoop::step() {
  const auto start = Clock::now();
  events_.clear();
  StepStats stats;
  try {
    stats = engine_->step(events_);
  } catch (const std::exception& e) {
    // The engine reports device errors per request (FinishReason::kError); an exception here is
    // a broken invariant. Fail what is in flight, keep serving.
    spdlog::error("engine step failed: {}", e.what());
    in_flight_ -= active_.size();
    for (auto& [id, active] : active_) {
      engine_->cancel(id);
      metrics_.count_failure("INTERNAL");
      active.channel->push_error(StreamError::kInternal, std::string("engine error: ") + e.what(),
                                 &pokes_);
    }
    active_.clear();
    by_ticket_.clear();
    publish_snapshot();
    return;
  }
  const auto now = Clock::now();
  for (RequestId id : stats.admitted) {
    auto it = active_.find(id);
    if (it == active_.end() || it->second.admitted) continue;
    it->second.admitted = start;
    metrics_.observe_queue(seconds_between(it->second.request.arrival, start));
    metrics_.add_prompt_tokens(static_cast<int64_t>(it->second.request.generation.prompt.size()));
  }
  metrics_.add_preemptions(stats.preemptions);
  metrics_.add_prefix_cache_lookup(stats.prefix_cache_queries, stats.prefix_cache_hits);
  if (stats.decode_tokens + stats.prefill_tokens > 0) {
    metrics_.observe_batch_tokens(stats.decode_tokens + stats.prefill_tokens);
  }
  metrics_.observe_kv_errors(stats.kv_errors);
  // Before any final message: a client that has seen its stream end also sees the blocks freed.
  publish_snapshot();
  // Likewise, a client told of the loss finds new submissions refused and the loss reported.
  if (!engine_->device_lost().empty()) close_after_device_lost();

  // Counted before any message goes out, so /metrics never lags what a client has received.
  int generated = 0;
  for (const StepEvent& event : events_) {
    if (event.has_token && active_.count(event.request) != 0) ++generated;
  }
  if (generated > 0) {
    metrics_.add_generation_tokens(generated);
    recent_tokens_.emplace_back(now, generated);
  }
  for (const StepEvent& event : events_) {
    auto it = active_.find(event.request);
    if (it == active_.end()) continue;
    Active& active = it->second;
    if (event.has_token) on_token(event.request, active, event, now);
    if (event.finish != FinishReason::kNone) {
      --in_flight_;
      on_finish(active, event, now);
      by_ticket_.erase(active.ticket);
      active_.erase(it);
    }
  }
}

void EngineLoop::on_token(RequestId id, Active& active, const StepEvent& event,
                          Clock::time_point now) {
  if (!active.first_token) {
    active.first_token = now;
    metrics_.observe_ttft(seconds_between(active.request.arrival, now));
  } else {
    metrics_.observe_inter_token(seconds_between(*active.last_token, now));
  }
  active.last_token = now;
  ++active.completion_tokens;

  std::string text = active.text.push(event);
  if (active.text.stopped() && event.finish == FinishReason::kNone) {
    end_in_engine(id, active, Cancelled::kNo);
  }
  std::vector<float> logprobs;
  if (active.request.return_logprobs) logprobs.push_back(event.logprob);
  active.channel->push_chunk({event.token}, std::move(text), std::move(logprobs), &pokes_);
}

void EngineLoop::on_finish(Active& active, const StepEvent& event, Clock::time_point now) {
  const ServeRequest& request = active.request;
  StreamFinal timings;
  timings.total_seconds = seconds_between(request.arrival, now);
  timings.queue_seconds = seconds_between(request.arrival, active.admitted.value_or(now));
  timings.ttft_seconds =
      active.first_token ? seconds_between(request.arrival, *active.first_token) : 0;
  metrics_.observe_e2e(timings.total_seconds);
  const std::string outcome = report_end(active, event, timings);
  spdlog::info(
      "request {} finished: {} | prompt {} tokens, completion {} tokens | queue {:.3f} s, "
      "ttft {:.3f} s, total {:.3f} s",
      request.id, outcome, request.generation.prompt.size(), active.completion_tokens,
      timings.queue_seconds, timings.ttft_seconds, timings.total_seconds);
}

std::string EngineLoop::report_end(Active& active, const StepEvent& event,
                                   const StreamFinal& timings) {
  switch (active.cancelled) {
    case Cancelled::kClientGone:  // nobody is listening
      metrics_.count_failure("CANCELLED");
      return "CANCELLED by the client";
    case Cancelled::kDeadline:
      metrics_.count_failure("DEADLINE_EXCEEDED");
      active.channel->push_error(
          StreamError::kDeadlineExceeded,
          "the request's deadline passed after " + std::to_string(active.completion_tokens) +
              " generated tokens; set a longer deadline or fewer max_new_tokens",
          &pokes_);
      return "DEADLINE_EXCEEDED";
    case Cancelled::kDrain:
    case Cancelled::kNo:
      break;
  }
  if (event.finish == FinishReason::kError && active.cancelled == Cancelled::kNo &&
      !active.text.stopped()) {
    metrics_.count_failure("INTERNAL");
    // After a device loss the error already says so ("device lost: ...").
    active.channel->push_error(
        StreamError::kInternal,
        engine_->device_lost().empty() ? "engine error: " + event.error : event.error, &pokes_);
    return "INTERNAL: " + event.error;
  }
  StreamFinal final = timings;
  final.prompt_tokens = static_cast<int>(active.request.generation.prompt.size());
  final.completion_tokens = active.completion_tokens;
  if (active.text.stopped()) {
    final.reason = FinishReason::kStop;
    final.matched_stop = active.text.matched_stop();
  } else if (active.cancelled == Cancelled::kDrain) {
    final.reason = FinishReason::kCancelled;
    // Text held back for a stop string that can no longer match.
    std::string rest = active.text.flush();
    if (!rest.empty()) active.channel->push_chunk({}, std::move(rest), {}, &pokes_);
  } else {
    final.reason = event.finish;
    if (final.reason == FinishReason::kStop && event.has_token) {
      final.matched_stop = std::to_string(event.token);  // a stop token id
    }
  }
  metrics_.count_success(final.reason);
  active.channel->push_final(final, &pokes_);
  return to_string(final.reason);
}

void EngineLoop::publish_snapshot() {
  EngineSnapshot snapshot{engine_->cache().usage(), engine_->num_running(), engine_->num_waiting()};
  metrics_.set_cache(snapshot.cache);
  metrics_.set_requests(snapshot.running, snapshot.waiting);
  std::lock_guard<std::mutex> lock(mu_);
  snapshot_ = snapshot;
  queued_in_engine_ = snapshot.waiting;
}

void EngineLoop::close_after_device_lost() {
  // Setting device_lost_ under the lock that submit() takes closes the inbox for good.
  {
    std::lock_guard<std::mutex> lock(mu_);
    device_lost_ = engine_->device_lost();
  }
  spdlog::error(
      "device lost: {}; every request in flight fails with INTERNAL, new ones are refused",
      device_lost_);
  if (options_.on_device_lost) options_.on_device_lost(device_lost_);
}

void EngineLoop::fail_inbox_after_device_lost() {
  // The engine has ended every request it held, in the last step's events; what is left are the
  // submissions that reached the inbox after it was drained.
  const std::string message = "device lost: " + device_lost_;
  std::deque<InboxItem> items;
  {
    std::lock_guard<std::mutex> lock(mu_);
    items.swap(inbox_);
  }
  for (InboxItem& item : items) {
    auto* submission = std::get_if<Submission>(&item);
    if (submission == nullptr) continue;
    spdlog::warn("request {} finished: INTERNAL: {}", submission->request.id, message);
    metrics_.count_failure("INTERNAL");
    --in_flight_;
    submission->channel->push_error(StreamError::kInternal, message, &pokes_);
  }
  publish_snapshot();
}

void EngineLoop::update_throughput(Clock::time_point now) {
  while (!recent_tokens_.empty() && recent_tokens_.front().first + kThroughputWindow <= now) {
    recent_tokens_.pop_front();
  }
  int tokens = 0;
  for (const auto& [time, count] : recent_tokens_) tokens += count;
  metrics_.set_tokens_per_second(tokens / std::chrono::duration<double>(kThroughputWindow).count());
}

}  // namespace kvserve
