// The RAM cache of routed experts kept on storage (the expert store, mobilemoe.runtime.offload):
// per layer C slots filled with one preadv of an expert's record on a miss, LRU eviction that never
// evicts an expert the current call needs, an optional cap on the experts resident over all layers,
// and I/O counters. NativeModel's offloaded layers and mobilemoe.remoe.device.ExpertStore both use it.
#pragma once
#include <torch/extension.h>

#include <string>
#include <vector>

namespace mobilemoe_cache __attribute__((visibility("hidden"))) {

struct CacheStats {
  int64_t hits = 0, misses = 0, bytes_read = 0;
  double read_seconds = 0.0;
};

class ExpertCache {
 public:
  // Opens the store file. drop_page_cache: drop its cached pages now and each record's pages after
  // it is read (POSIX_FADV_DONTNEED), so every miss reads the storage device instead of RAM.
  ExpertCache(const std::string& path, bool drop_page_cache);
  ~ExpertCache();
  ExpertCache(const ExpertCache&) = delete;
  ExpertCache& operator=(const ExpertCache&) = delete;

  // Layer `layer` caches experts in `slots`: the record's parts in store order, each [C, ...] (C
  // slots); record_offsets [E] is each expert's byte offset in the store file.
  void add_layer(int64_t layer, const at::Tensor& record_offsets, std::vector<at::Tensor> slots);
  // Makes every expert of `need` resident, in order (one access each, counted as a hit or a miss),
  // never evicting one of `need` or `pinned`; returns their slots.
  std::vector<int64_t> fetch(int64_t layer, const std::vector<int64_t>& need,
                             const std::vector<int64_t>& pinned = {});
  // At most n experts resident over all layers (n < 0: only the per-layer capacities): a miss over
  // the cap first evicts the least recently used unneeded expert of the fullest layer.
  void set_max_resident(int64_t n) { max_resident_ = n; }

  const std::vector<at::Tensor>& slots(int64_t layer) const { return layer_at(layer).slots; }
  int64_t capacity(int64_t layer) const { return (int64_t)layer_at(layer).expert_of.size(); }
  int64_t resident_bytes() const;
  const CacheStats& stats() const { return stats_; }
  void reset_stats() { stats_ = CacheStats(); }

 private:
  struct Layer {
    bool present = false;
    std::vector<at::Tensor> slots;
    std::vector<int64_t> slot_bytes;     // per part: bytes of one slot
    std::vector<int64_t> record_offset;  // expert -> byte offset of its record
    std::vector<int64_t> slot_of;        // expert -> slot, or -1
    std::vector<int64_t> expert_of;      // slot -> expert, or -1 (free)
    std::vector<int64_t> last_use;       // slot -> access clock
    int64_t resident = 0;
    int64_t record_bytes = 0;
  };
  const Layer& layer_at(int64_t layer) const;
  void read_record(Layer& L, int64_t e, int64_t slot);
  void evict(Layer& L, int64_t slot);
  bool evict_for_cap(int64_t layer, const std::vector<char>& needed);

  int fd_ = -1;
  bool drop_cache_ = false;
  std::vector<Layer> layers_;
  int64_t clock_ = 0, resident_ = 0, max_resident_ = -1;
  CacheStats stats_;
};

void register_expert_cache(pybind11::module_& m);

}  // namespace mobilemoe_cache
